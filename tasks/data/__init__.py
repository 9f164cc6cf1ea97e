"""Training and evaluation data: pairs JSONL (ms-swift, FlagEmbedding, triplets) and BEIR folders.

Every reader checks what it reads where it reads it: an error names the file, the line and the
field. `skip_bad_lines=True` (or `skip_bad_lines: true` on a data source) skips malformed lines
instead, and says how many it skipped.

Training pairs stream from disk: `load_source` indexes a JSONL file once (validating every line)
and keeps only the byte offset of each pair's line, so a training set larger than memory is read
line by line in whatever order the trainer asks for.

  jsonl.py    JSONL lines, `DataError` (file:line:field), `ReadReport` (skip_bad_lines)
  pairs.py    `Pair`, the record formats, `PairFile` (streamed from disk), `read_pairs`
  beir.py     BEIR folders (`load_beir`) and the pairs they give (`pairs_from_beir`)
  sources.py  a stage's `data:` sources as one sequence of pairs (`load_source(s)`)
  catalog.py  the data catalog (conf/catalog.yaml): hub data sets by name, streamed into a JSONL cache
  sts.py      STS TSVs as a BEIR folder or as training pairs (built into data/ by `data.derived`)
  writing.py  atomic writes (`atomic_write_text`, `write_jsonl`) and file modes

The names below are the package's interface: import them from `tasks.data`.
"""

from tasks.data.beir import Beir, doc_text, is_beir, load_beir, pairs_from_beir
from tasks.data.jsonl import DataError, ReadReport, iter_jsonl
from tasks.data.pairs import Pair, PairChain, PairFile, pairs_from_record, read_pairs
from tasks.data.sources import load_source, load_sources, resolve_path
from tasks.data.sts import sts_to_beir, sts_to_pairs
from tasks.data.writing import atomic_write_text, file_mode, honour_umask, write_jsonl

__all__ = [
    "Beir", "DataError", "Pair", "PairChain", "PairFile", "ReadReport", "atomic_write_text", "doc_text",
    "file_mode", "honour_umask", "is_beir", "iter_jsonl", "load_beir", "load_source", "load_sources",
    "pairs_from_beir", "pairs_from_record", "read_pairs", "resolve_path", "sts_to_beir", "sts_to_pairs",
    "write_jsonl",
]
