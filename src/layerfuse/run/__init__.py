"""`layerfuse run`: fused embeddings for a whole corpus, resumable and bad-row tolerant, locally or on Ray.

corpus.py      read .txt, .jsonl, .csv, .parquet row by row; bad rows become rejects
inputs.py      Inputs: a corpus's files, given as a file, a folder, a glob or a list, local or remote
fusion.py      the run's FusionConfig and info: checked to suit a run, attached to each model, described
truncation.py  capped: tokenise no more of a row than its first tokens come from
embedding.py   Embedder: length-sorted batches under inference mode, pooling, NaN and truncation flags
pooling.py     pool: the embedding of a text from its tokens' states, as sentence-transformers pools
st_folder.py   read_st_folder: a sentence-transformers folder's pooling, normalisation and max length
tables.py      shards of the corpus as Arrow tables; the output's columns
shards.py      ShardStore: shards and manifest with atomic renames, for resuming
formats.py     the finished output: .parquet, .npy, .safetensors
summary.py     RunSummary and its report
job.py         embed_corpus: check everything, then run an engine
local.py       the local engine
ray_engine.py  the Ray Data engine: streaming, a Parquet file per block, resumable
"""

from .embedding import POOLINGS, Embedder
from .job import ENGINES, embed_corpus
from .summary import RunSummary

__all__ = ["ENGINES", "POOLINGS", "Embedder", "RunSummary", "embed_corpus"]
