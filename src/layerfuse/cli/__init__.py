"""The `layerfuse` command: parses, calls the library, prints.

    layerfuse compare --layer 3 --method clamp --value 2 --positions tokens --json
    layerfuse methods
    layerfuse inspect
    layerfuse run corpus.jsonl --output embeddings.parquet --layer 3 --info steer.npy

    main.py           the parser, built from the commands, and the dispatch
    options.py        the options several commands share, defined once; their argument types
    methods.py        layerfuse methods
    inspect_model.py  layerfuse inspect
    compare.py        layerfuse compare
    derive.py         layerfuse derive
    run.py            layerfuse run
    bench.py          layerfuse bench
    sweep.py          layerfuse sweep
    merge.py          layerfuse merge

A command imports its heavy modules (pyarrow, the bench) inside its function, so `layerfuse --help` stays light.
"""

from .main import main

__all__ = ["main"]
