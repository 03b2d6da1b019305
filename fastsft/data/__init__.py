"""fastsft.data: record files -> validated, templated, tokenized TokenStores.

Main entry point: `build_dataset(specs, tokenizer, max_seq_len=...) -> DatasetBundle`.
"""

from .errors import DataError, RecordError
from .formats import FORMATS, detect_format, normalize, read_records
from .pipeline import (DatasetBundle, DatasetSpec, build_dataset, encode_record, load_dataset,
                       mixture_indices, split_eval, tokenize_rendered)
from .store import IGNORE_INDEX, TokenStore
from .templates import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, alpaca_prompt, prompt_text,
                        render_conversation, render_example)
from .tokenizer import (BYTE_MARKER_FILE, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer,
                        render_chatml)

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "BYTE_MARKER_FILE", "ByteTokenizer", "DataError",
    "DatasetBundle", "DatasetSpec", "FORMATS", "HFTokenizer", "IGNORE_INDEX", "RecordError",
    "TokenStore", "Tokenizer", "alpaca_prompt", "build_dataset", "detect_format", "encode_record",
    "load_dataset", "load_tokenizer", "mixture_indices", "normalize", "prompt_text", "read_records",
    "render_chatml", "render_conversation", "render_example", "split_eval", "tokenize_rendered",
]
