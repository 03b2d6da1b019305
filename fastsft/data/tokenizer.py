"""The one tokenizer interface the rest of fastsft uses.

    encode(text) -> (ids, offsets)      no special tokens added; offsets are (start, end) character
                                        offsets into `text`, one per id
    encode_batch(texts)                 the same for many texts (one call into Rust for HF)
    decode(ids, skip_special_tokens=True) -> str
    vocab_size, bos_id, eos_id, pad_id  (pad falls back to eos), stop_ids
    has_chat_template, render_chat(messages, add_generation_prompt=False) -> str
    token_to_id(tok) -> int | None, save(dir)

Two implementations: `ByteTokenizer` (UTF-8 bytes plus five specials; needs no files, used by the
"tiny" model preset and the tests) and `HFTokenizer` (any fast `transformers` tokenizer).
`load_tokenizer(spec)` picks one.

Tokenizers without a chat template render conversations as ChatML:
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, generation prompt ``<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_GENERATION_PROMPT = f"{IM_START}assistant\n"
BYTE_MARKER_FILE = "fastsft_tokenizer.json"  # written by ByteTokenizer.save, read by load_tokenizer


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (CHATML_GENERATION_PROMPT if add_generation_prompt else "")


class Tokenizer:
    """Base class: ChatML rendering, batch encoding by loop, stop ids."""

    name = "tokenizer"

    # --- to implement ------------------------------------------------------------------------
    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_to_id(self, tok: str) -> int | None:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def bos_id(self) -> int | None:
        raise NotImplementedError

    @property
    def eos_id(self) -> int | None:
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        return False

    def _render_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int | None:
        return self.eos_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated response: EOS, plus `<|im_end|>` when conversations are
        rendered as ChatML and the tokenizer has it as a single token (it then ends assistant turns
        instead of EOS)."""
        ids = [] if self.eos_id is None else [self.eos_id]
        im_end = self.token_to_id(IM_END)
        if not self.has_chat_template and im_end is not None and im_end not in ids:
            ids.append(im_end)
        return ids

    def encode_batch(self, texts: Sequence[str], offsets: Sequence[bool] | None = None
                     ) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
        """(ids, character offsets) per text; with ``offsets``, None instead of the offsets of the texts
        marked False (converting them is a good part of the cost for a fast tokenizer)."""
        out = [self.encode(t) for t in texts]
        return out if offsets is None else [(i, o if want else None) for (i, o), want in zip(out, offsets)]

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """Render `[{"role", "content"}, ...]` with the tokenizer's chat template, or ChatML."""
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.has_chat_template:
            return self._render_template(messages, add_generation_prompt)
        return render_chatml(messages, add_generation_prompt)


# ------------------------------------------------------------------------------------------------
# Byte-level tokenizer


class ByteTokenizer(Tokenizer):
    """ids 0..255 are raw UTF-8 bytes; then `<pad>`=256, `<s>`=257, `</s>`=258, `<|im_start|>`=259,
    `<|im_end|>`=260. vocab_size is 272: rounded up to a multiple of 16 (ids 261..271 are unused),
    matching the "tiny" model preset. Special-token strings in the text are matched atomically."""

    name = "byte"
    SPECIALS = {"<pad>": 256, "<s>": 257, "</s>": 258, IM_START: 259, IM_END: 260}
    VOCAB_SIZE = 272
    _SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    def __init__(self):
        self._id_to_special = {v: k for k, v in self.SPECIALS.items()}

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    @property
    def bos_id(self) -> int:
        return self.SPECIALS["<s>"]

    @property
    def eos_id(self) -> int:
        return self.SPECIALS["</s>"]

    @property
    def pad_id(self) -> int:
        return self.SPECIALS["<pad>"]

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for piece in self._SPLIT.split(text):
            if not piece:
                continue
            special = self.SPECIALS.get(piece)
            if special is not None:
                ids.append(special)
                offsets.append((pos, pos + len(piece)))
            elif piece.isascii():
                ids.extend(piece.encode("ascii"))
                offsets.extend((i, i + 1) for i in range(pos, pos + len(piece)))
            else:
                # a multibyte character gives several byte ids that all map to the same character
                for i, ch in enumerate(piece, start=pos):
                    try:
                        b = ch.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ValueError(f"text is not valid Unicode (lone surrogate at character {i})") from None
                    ids.extend(b)
                    offsets.extend([(i, i + 1)] * len(b))
            pos += len(piece)
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            if not skip_special_tokens and i in self._id_to_special:
                out.append(self._id_to_special[i])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, tok: str) -> int | None:
        if tok in self.SPECIALS:
            return self.SPECIALS[tok]
        if len(tok) == 1 and ord(tok) < 128:
            return ord(tok)
        return None

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / BYTE_MARKER_FILE).write_text(
            json.dumps({"type": "byte", "vocab_size": self.VOCAB_SIZE}) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# ------------------------------------------------------------------------------------------------
# Hugging Face tokenizers


class HFTokenizer(Tokenizer):
    """Wraps a fast `transformers` tokenizer (offsets need the Rust backend). The wrapped object is
    `self.hf`; setting `self.hf.chat_template` changes how conversations render."""

    def __init__(self, hf_tokenizer: Any, name: str | None = None):
        if not getattr(hf_tokenizer, "is_fast", False):
            raise ValueError(f"{type(hf_tokenizer).__name__} is not a fast tokenizer; fastsft needs "
                             "character offsets, which only fast (Rust) tokenizers provide")
        self.hf = hf_tokenizer
        self.name = name or getattr(hf_tokenizer, "name_or_path", None) or "hf"
        self._vocab: dict[str, int] | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, trust_remote_code: bool = False, **kwargs) -> "HFTokenizer":
        """``trust_remote_code`` stays False unless the user sets it (``model.trust_remote_code``)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=bool(trust_remote_code), **kwargs)
        return cls(tok, name=str(path))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # includes added tokens, unlike hf.vocab_size

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int | None:
        pad = self.hf.pad_token_id
        return self.eos_id if pad is None else pad

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def _render_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        out = self.hf.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        if not isinstance(out, str):
            raise ValueError(f"chat template returned {type(out).__name__}, expected str")
        return out

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], offsets: Sequence[bool] | None = None
                     ) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
        if not texts:
            return []
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:  # straight to Rust: transformers' per-encoding conversion costs ~as much
            encodings = backend.encode_batch(list(texts), add_special_tokens=False)
            if offsets is None:
                return [(e.ids, e.offsets) for e in encodings]
            return [(e.ids, e.offsets if want else None) for e, want in zip(encodings, offsets)]
        enc = self.hf(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                      return_attention_mask=False)
        return [(list(ids), [tuple(o) for o in offs])
                for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, tok: str) -> int | None:
        if self._vocab is None:
            self._vocab = self.hf.get_vocab()
        return self._vocab.get(tok)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------------------------


def load_tokenizer(spec: Any, *, trust_remote_code: bool = False) -> Tokenizer:
    """`"byte"` -> ByteTokenizer; a directory written by `ByteTokenizer.save` -> ByteTokenizer;
    a `Tokenizer` or `transformers` tokenizer object -> itself (wrapped); anything else goes to
    `AutoTokenizer.from_pretrained(spec)` (running no code from it unless `trust_remote_code`).
    Failures are a one-line ValueError naming `spec`."""
    if isinstance(spec, Tokenizer):
        return spec
    if not isinstance(spec, (str, Path)):
        if hasattr(spec, "apply_chat_template") and hasattr(spec, "convert_tokens_to_ids"):
            return HFTokenizer(spec)
        raise ValueError(f"cannot load a tokenizer from a {type(spec).__name__}")
    s = str(spec)
    if s == "byte":
        return ByteTokenizer()
    path = Path(s).expanduser()
    marker = path / BYTE_MARKER_FILE
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("type")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"cannot load tokenizer {s!r}: unreadable {BYTE_MARKER_FILE}: {e}") from None
        if kind != "byte":
            raise ValueError(f"cannot load tokenizer {s!r}: unknown type {kind!r} in {BYTE_MARKER_FILE}")
        return ByteTokenizer()
    local = path.exists()
    if not local and (s.startswith(("/", ".", "~")) or "\\" in s):
        raise ValueError(f"cannot load tokenizer {s!r}: no such file or directory")
    if local and path.is_file() and path.name.lower().endswith(".gguf"):
        return _load_gguf_tokenizer(path, s)
    try:
        kwargs = {"local_files_only": True} if local else {}
        return HFTokenizer.from_pretrained(path if local else s, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, EnvironmentError, ...
        msg = " ".join(str(e).split())
        if len(msg) > 300:
            msg = msg[:300] + "..."
        raise ValueError(f"cannot load tokenizer {s!r}: {type(e).__name__}: {msg}") from None


def _load_gguf_tokenizer(path: Path, spec: str) -> HFTokenizer:
    """The tokenizer and chat template stored in a GGUF file (transformers converts them to a fast
    tokenizer; it runs no code from the file)."""
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ValueError(f"cannot load tokenizer {spec!r}: reading a GGUF file needs the gguf package: "
                         "pip install 'fastsft[gguf]'") from None
    try:
        tok = HFTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as e:  # transformers raises ValueError, KeyError, NotImplementedError, ...
        msg = " ".join(str(e).split())
        raise ValueError(f"cannot load the tokenizer of GGUF file {spec!r}: {type(e).__name__}: {msg[:300]}") \
            from None
    tok.name = spec
    return tok
