"""The measuring tools, apart from the library: they call the core, and the core never imports them.

    compare.py   `compare`: hook against custom layer on one padded batch, agreement and timings
    timing.py    interleaved timing round by round: medians, quartiles and paired ratios
    twins.py     copies of a model that share its weights, so plain and fused forwards can alternate
    bench/       `bench`: fused against plain forwards over a grid of shapes and threads
      grid.py      the grid: shapes, threads, rounds, one timed point, each method's own cost
      memory.py    tensor memory of one forward per variant, each in a fresh process
      compiled.py  torch.compile'd plain against compiled fused forwards
      report.py    everything measured, as JSON or Markdown tables
      plot.py      the ratios as a PNG (needs matplotlib)

>>> from layerfuse.lab.timing import time_calls
>>> len(time_calls({"plain": lambda: None}, repeats=2)["plain"])
2
"""
