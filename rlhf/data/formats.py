"""Loading and validating datasets for every stage.

Rows come from local JSONL / JSON / Parquet files (or a folder of them) through ``datasets``, or
from a hub dataset name (cluster recipes). JSONL is also read line by line so that a malformed
line is reported as ``file:line``. Every row is validated against the stage's format and a bad
row is a :class:`DataError` naming file, line and field — or, with ``skip_bad_rows``, skipped
and counted.

Formats (strings or chat message lists ``[{"role": ..., "content": ...}]``):

- SFT: ``{"prompt", "completion"}`` or ``{"messages"}`` (loss on every assistant turn).
- Preferences: ``{"prompt", "chosen", "rejected"}`` (optional ``margin``); the implicit-prompt
  form ``{"chosen", "rejected"}`` where both are whole transcripts sharing a prefix (Anthropic HH);
  K-way rankings ``{"prompt", "responses", "ranks" | "scores"}``.
- Prompts (PPO / sampling / eval): ``{"prompt"}`` plus any other fields reward functions read.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from ..errors import DataError

log = logging.getLogger(__name__)

Messages = list[dict]


@dataclass
class Row:
    data: dict
    source: str
    line: int
    row: int | None = None
    """The row's number too, where several rows start on one line (a .json array on one line)."""

    def where(self, fld: str | None = None) -> str:
        return f"{self.source}:{self.line}" + (f" (row {self.row})" if self.row else "") + \
            (f": field '{fld}'" if fld else "")


# ----------------------------------------------------------------------------- reading


_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def read_rows(spec: str, split: str = "train") -> list[Row]:
    """Read every row of a local file/folder or a hub dataset, keeping file and line."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _EXTS)
        if not files:
            raise DataError(f"{path}: folder holds no .jsonl/.json/.parquet files")
        return [r for p in files for r in read_rows(str(p))]
    if path.is_file():
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".json":  # read here, not by datasets: it would retype a mixed column ("01557" -> 1557)
            return _read_json(path)
        if path.suffix not in _EXTS:
            raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
        import datasets

        try:
            ds = datasets.load_dataset(_EXTS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # datasets wraps the parser's message
            raise DataError(f"{path}: cannot be read as {path.suffix[1:]} ({str(e).splitlines()[0]})") from None
        return [Row(dict(r), str(path), i + 1) for i, r in enumerate(ds)]
    mistyped = Path(spec.split("/")[0]).is_dir() and not _dataset_in_hub_cache(spec)  # (runs/x: not a hub id)
    if spec.endswith(tuple(_EXTS)) or spec.startswith((".", "/")) or "/" not in spec or mistyped:
        raise DataError(f"{spec}: data file not found")
    import datasets  # a hub name such as 'Anthropic/hh-rlhf'

    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as e:  # no network, no such dataset or split, a gated one: datasets' own error types vary
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise DataError(f"{spec}: no such local file, and the hub dataset cannot be loaded ({type(e).__name__}: "
                        f"{first})") from None
    return [Row(dict(r), spec, i + 1) for i, r in enumerate(ds)]


def _dataset_in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "README.md", repo_type="dataset"), str)
    except Exception:  # (not an id the hub accepts: not cached)
        return False


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: a key twice in one object is an error (json keeps the last silently)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _read_jsonl(path: Path) -> list[Row]:
    """Rows of a JSONL file: strict UTF-8 (a leading BOM is accepted; a bad byte is file:line:column)."""
    from ..textio import read_text

    rows, decoder = [], json.JSONDecoder(object_pairs_hook=_unique_keys)
    for i, line in enumerate(read_text(path, DataError).split("\n"), 1):
        if not line.strip():
            continue
        start = len(line) - len(line.lstrip())
        obj, end = _decode_row(path, line, start, i, decoder)
        if line[end:].strip():
            raise DataError(f"{path}:{i}: malformed JSON (Extra data)")
        rows.append(Row(obj, str(path), i))
    return rows


def _decode_row(path: Path, text: str, i: int, line: int, decoder: json.JSONDecoder) -> tuple[dict, int]:
    """The JSON object at `text[i:]` (which starts on `line`) and where it ends; one-line errors."""
    try:
        obj, end = decoder.raw_decode(text, i)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line + text.count(chr(10), i, e.pos)}: malformed JSON ({e.msg})") from None
    except _DuplicateKey as e:
        raise DataError(f"{path}:{line}: duplicate key '{e}' in one object") from None
    except ValueError as e:  # (an integer of over 4300 digits: Python's int conversion limit)
        raise DataError(f"{path}:{line}: malformed JSON ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line}: a row must be a JSON object")
    return obj, end


def _read_json(path: Path) -> list[Row]:
    """Rows of a .json file: a JSON array of objects, or objects one after another (JSON Lines,
    pretty-printed or not, as datasets reads them), each named by the line it starts on (and its
    number, where several start on one line). Linear in the file's size."""
    from ..textio import read_text

    text = read_text(path, DataError)
    decoder, ws = json.JSONDecoder(object_pairs_hook=_unique_keys), " \t\r\n"
    seen = [0, 1]  # (position, its line): newlines are counted once, forward, never from the start again

    def line_at(i: int) -> int:
        seen[1] += text.count("\n", seen[0], i)
        seen[0] = i
        return seen[1]

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def value(i: int) -> tuple[Row, int]:
        line = line_at(i)
        obj, end = _decode_row(path, text, i, line, decoder)
        return Row(obj, str(path), line), end

    rows, i = [], skip(0)
    if text.startswith("[", i):
        i = skip(i + 1)
        while not text.startswith("]", i):
            row, i = value(i)
            rows.append(row)
            i = skip(i)
            if text.startswith(",", i):
                i = skip(i + 1)
            elif not text.startswith("]", i):
                raise DataError(f"{path}:{line_at(i)}: malformed JSON (expected ',' or ']')")
        if skip(i + 1) != len(text):
            raise DataError(f"{path}:{line_at(i)}: malformed JSON (text after the closing ']')")
    else:
        while i < len(text):
            row, i = value(i)
            rows.append(row)
            i = skip(i)
    per_line = {}
    for r in rows:
        per_line[r.line] = per_line.get(r.line, 0) + 1
    for n, r in enumerate(rows, 1):
        r.row = n if per_line[r.line] > 1 else None
    return rows


def to_dataset(rows: list[Row]):
    """The validated rows as a `datasets.Dataset` (for users who want its tools)."""
    import datasets

    return datasets.Dataset.from_list([r.data for r in rows])


# ----------------------------------------------------------------------------- validation


def _bad_message(row: Row, fld: str, v: Any) -> str | None:
    """For a list that is not a list of {role, content} messages: the first element at fault, as
    'file:line: field 'fld[i].content': ...' (None when `v` is no list at all)."""
    if not isinstance(v, list):
        return None
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            return f"{row.where(f'{fld}[{i}]')}: expected a {{role, content}} message, got {type(m).__name__}"
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"expected a string, got {type(m[key]).__name__}"
                return f"{row.where(f'{fld}[{i}].{key}')}: {got}"
    return None


def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v)


def text_or_messages(row: Row, fld: str, *, required: bool = True, allow_empty: bool = False) -> str | Messages | None:
    if fld not in row.data or row.data[fld] is None:
        if required:
            raise DataError(f"{row.where(fld)}: {'missing' if fld not in row.data else 'is null'}")
        return None
    v = row.data[fld]
    if isinstance(v, str):
        if not v.strip() and not allow_empty:
            raise DataError(f"{row.where(fld)}: empty string")
        return v
    if _is_messages(v):
        if not v:
            raise DataError(f"{row.where(fld)}: empty message list")
        return v
    raise DataError(_bad_message(row, fld, v) or f"{row.where(fld)}: expected a string or a list of {{role, content}} "
                                                 f"messages, got {type(v).__name__}")


ROLES = ("system", "user", "assistant", "tool")
_ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
               "function": "tool", "ipython": "tool"}


def check_turns(row: Row, turns: list[tuple[str, dict]], ends_on: tuple[str, ...]) -> None:
    """Validate a conversation given as [(field path, message)]: known roles, a system message only
    first, user and assistant alternating (tool results only right after an assistant turn, and
    followed by the assistant), and the last turn's role in `ends_on` (SFT conversations end on
    the assistant, prompts on the user). Each violation names file:line and the message's field."""
    prev = None
    for i, (fld, m) in enumerate(turns):
        role = m["role"]
        if role not in ROLES:
            hint = f" (did you mean '{_ROLE_HINTS[role.lower()]}'?)" if role.lower() in _ROLE_HINTS else ""
            raise DataError(f"{row.where(fld + '.role')}: unknown role '{role}' (expected {', '.join(ROLES)}){hint}")
        if role == "system" and i > 0:
            raise DataError(f"{row.where(fld + '.role')}: a system message may only come first")
        allowed = {None: ("system", "user"), "system": ("user",), "user": ("assistant",),
                   "assistant": ("user", "tool"), "tool": ("tool", "assistant")}[prev]
        if role not in allowed:
            what = f"two {role} turns in a row" if role == prev else f"{_a(role)} turn after {_a(prev)} turn"
            raise DataError(f"{row.where(fld + '.role')}: {what}; turns must alternate user / assistant "
                            f"(tool results only after an assistant turn)")
        prev = role
    if turns and prev not in ends_on:
        raise DataError(f"{row.where(turns[-1][0] + '.role')}: the conversation ends on {_a(prev)} turn; "
                        f"{_a(' or '.join(ends_on))} turn is expected here")


def _a(word: str) -> str:
    return ("an " if word[:1] in "ao" else "a ") + word  # (roles: an assistant, a user, a system, a tool)


def _turns(fld: str, msgs: Messages) -> list[tuple[str, dict]]:
    return [(f"{fld}[{i}]", m) for i, m in enumerate(msgs)]


def as_prompt_messages(p: str | Messages) -> Messages:
    return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)


def as_response_messages(r: str | Messages) -> Messages:
    return [{"role": "assistant", "content": r}] if isinstance(r, str) else list(r)


@dataclass
class SFTExample:
    prompt: Messages
    completion: Messages
    """Assistant (and possibly further) turns; loss on assistant turns only."""
    meta: dict = field(default_factory=dict)
    fields: tuple[str, str] = ("prompt", "completion")
    """The row's fields holding prompt and completion (('messages', 'messages') for conversations)."""


def parse_sft(row: Row) -> SFTExample:
    d = row.data
    if "messages" in d:
        msgs = d["messages"]
        if not _is_messages(msgs) or not msgs:
            raise DataError(_bad_message(row, "messages", msgs) or
                            f"{row.where('messages')}: expected a non-empty list of {{role, content}} messages")
        first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
        if first is None:
            raise DataError(f"{row.where('messages')}: no assistant message to learn from")
        if first == 0 or (first == 1 and msgs[0]["role"] == "system"):
            raise DataError(f"{row.where('messages')}: conversation starts with the assistant; no prompt")
        check_turns(row, _turns("messages", msgs), ends_on=("assistant",))
        return SFTExample(msgs[:first], msgs[first:], _meta(d, ("messages",)), ("messages", "messages"))
    if "prompt" not in d and "completion" not in d:
        raise DataError(f"{row.where()}: expected fields 'prompt' and 'completion', or 'messages'")
    prompt = text_or_messages(row, "prompt")
    completion = text_or_messages(row, "completion")
    p, c = as_prompt_messages(prompt), as_response_messages(completion)
    check_turns(row, _turns("prompt", p) + _turns("completion", c), ends_on=("assistant",))
    if c[0]["role"] != "assistant":
        raise DataError(f"{row.where('completion[0].role')}: a completion starts with the assistant turn")
    return SFTExample(p, c, _meta(d, ("prompt", "completion")))


@dataclass
class PrefGroup:
    """All preference pairs from one prompt (a K-way ranking gives C(K,2) of them)."""

    prompt: Messages | str
    """Messages (chat-templated) or raw text (implicit-prompt transcripts)."""
    responses: list[Messages | str]
    pairs: list[tuple[int, int, float]]
    """(chosen index, rejected index, margin) into `responses`."""
    source: str = ""
    fields: list[str] = field(default_factory=lambda: ["chosen", "rejected"])
    """The row's field holding each response (for errors: 'rejected', 'responses[2]')."""


def _number(row: Row, fld: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DataError(f"{row.where(fld)}: expected a finite number, got {v!r}")
    return float(v)


def _one_reply(row: Row, fld: str, response) -> None:
    """A reward model scores one assistant reply after the prompt (rlhf.tokenization.encode_response
    renders the first message only): a response of several turns would be cut to its first, and
    two that differ only later would score the same. Refused, naming the field."""
    if isinstance(response, list) and len(response) > 1:
        raise DataError(f"{row.where(fld)}: a response of {len(response)} messages; a preference compares one "
                        f"assistant reply: put the earlier turns in the prompt")


SCORED_FIELDS = ("response", "completion", "chosen", "rejected")
"""The response fields `rlhf score` reads from a row, each scored into 'score' (response,
completion), 'score_chosen' or 'score_rejected'."""


def parse_scored(row: Row) -> list[tuple[str, Messages, Messages]]:
    """A row for `rlhf score` -> [(field, prompt messages, reply messages)], one per response field
    it has, checked as a preference row's responses are (roles and turn order, one assistant reply;
    chosen and rejected given as whole conversations are split at their shared prefix, as in RM
    training). 'response' and 'completion' together are refused: both would be written to 'score'."""
    d = row.data
    fields = [f for f in SCORED_FIELDS if f in d]
    out = []
    split = _whole_conversations(row)
    if split is not None:
        prompt_m, c, r = split
        out += [("chosen", prompt_m, c), ("rejected", prompt_m, r)]
        fields = [f for f in fields if f not in ("chosen", "rejected")]
    if not fields and out:
        return out
    if "prompt" not in d or not fields:
        raise DataError(f"{row.where()}: expected 'prompt' and 'response' (or 'completion', 'chosen', 'rejected')")
    if "response" in d and "completion" in d:
        raise DataError(f"{row.where('completion')}: a row with both 'response' and 'completion'; both would be "
                        f"scored into 'score': keep one")
    prompt = as_prompt_messages(text_or_messages(row, "prompt"))
    for fld in fields:
        reply = as_response_messages(text_or_messages(row, fld, allow_empty=True))
        _check_reply(row, prompt, fld, reply)
        out.append((fld, prompt, reply))
    return out


def _whole_conversations(row: Row) -> tuple | None:
    """(prompt, chosen reply, rejected reply) of a row whose chosen and rejected are whole
    conversations (UltraFeedback-binarized style, even with a 'prompt' field), split at their shared
    prefix after their turns are checked; None for any other row."""
    whole = [row.data.get(f) for f in ("chosen", "rejected")]
    if not all(_is_messages(v) and v and v[0]["role"] != "assistant" for v in whole):
        return None
    for fld, v in zip(("chosen", "rejected"), whole):
        check_turns(row, _turns(fld, v), ends_on=("assistant",))
    return split_implicit_prompt(whole[0], whole[1], row)


def _check_reply(row: Row, prompt: Messages, fld: str, reply: Messages) -> None:
    """A response to score or compare after `prompt`: the turns in order, one assistant reply."""
    check_turns(row, _turns("prompt", prompt) + _turns(fld, reply), ends_on=("assistant",))
    if reply and reply[0]["role"] != "assistant":
        raise DataError(f"{row.where(fld + '[0].role')}: a response starts with the assistant turn")
    _one_reply(row, fld, reply)


def parse_preference(row: Row, stats: dict | None = None) -> PrefGroup | None:
    """One preference row -> a PrefGroup (None if it carries no usable pair: all ties/duplicates)."""
    stats = stats if stats is not None else {}
    d = row.data
    if "responses" in d:
        return _parse_ranking(row, stats)
    for fld in ("chosen", "rejected"):
        if fld not in d:
            raise DataError(f"{row.where(fld)}: missing (expected prompt/chosen/rejected or prompt/responses/ranks)")
    margin = _number(row, "margin", d["margin"]) if d.get("margin") is not None else 0.0
    split = _whole_conversations(row)
    if split is not None:
        prompt_m, c, r = split
        return PrefGroup(prompt_m, [c, r], [(0, 1, margin)], row.where())
    if "prompt" in d and d["prompt"] is not None:
        prompt = text_or_messages(row, "prompt")
        chosen = text_or_messages(row, "chosen", allow_empty=True)  # an empty reply is a (bad) reply
        rejected = text_or_messages(row, "rejected", allow_empty=True)
        if isinstance(prompt, str) and (not isinstance(chosen, str) or not isinstance(rejected, str)):
            if not (isinstance(chosen, list) and isinstance(rejected, list)):
                raise DataError(f"{row.where('chosen')}: chosen and rejected must both be strings or both messages")
        prompt_m = as_prompt_messages(prompt)
        responses = [as_response_messages(chosen), as_response_messages(rejected)]
        for fld, r in zip(("chosen", "rejected"), responses):
            _check_reply(row, prompt_m, fld, r)
    else:  # implicit prompt: two transcripts sharing a prefix
        chosen = text_or_messages(row, "chosen")
        rejected = text_or_messages(row, "rejected")
        prompt_m, c, r = split_implicit_prompt(chosen, rejected, row)
        responses = [c, r]
    if responses[0] == responses[1]:
        _duplicate(row, "rejected", "chosen and rejected are the same response", stats)
        return None
    return PrefGroup(prompt_m, responses, [(0, 1, margin)], row.where())


def _duplicate(row: Row, fld: str, what: str, stats: dict) -> None:
    """Count a pair that carries no signal; warn once per run with its file:line."""
    stats["duplicate_pairs"] = stats.get("duplicate_pairs", 0) + 1
    if stats["duplicate_pairs"] == 1:
        log.warning("%s: %s: the pair is dropped (counted as duplicate_pairs in summary.json; further ones "
                    "are not warned about)", row.where(fld), what)


def _parse_ranking(row: Row, stats: dict) -> PrefGroup | None:
    d = row.data
    prompt = text_or_messages(row, "prompt")
    check_turns(row, _turns("prompt", as_prompt_messages(prompt)), ends_on=("user", "tool"))
    resp = d["responses"]
    if not isinstance(resp, list) or len(resp) < 2:
        raise DataError(f"{row.where('responses')}: expected a list of at least 2 responses")
    responses = []
    for i, r in enumerate(resp):
        if not isinstance(r, str) and not (_is_messages(r) and r):  # "" is allowed: a policy may say nothing
            raise DataError(f"{row.where(f'responses[{i}]')}: expected a string or a non-empty message list")
        _one_reply(row, f"responses[{i}]", r)
        responses.append(as_response_messages(r))
    if ("ranks" in d) == ("scores" in d):
        raise DataError(f"{row.where('ranks')}: give exactly one of 'ranks' (1 = best) or 'scores' (higher = better)")
    key = "ranks" if "ranks" in d else "scores"
    vals = d[key]
    if not isinstance(vals, list) or len(vals) != len(resp):
        raise DataError(f"{row.where(key)}: expected a list of {len(resp)} numbers, one per response")
    vals = [_number(row, f"{key}[{i}]", v) for i, v in enumerate(vals)]
    for i, v in enumerate(vals if key == "ranks" else []):  # (scores put under 'ranks' would train inverted)
        if v < 1 or v != int(v):
            raise DataError(f"{row.where(f'ranks[{i}]')}: a rank is a whole number >= 1 (1 = best), got {v!r}; "
                            f"for values where higher is better use 'scores'")
    goodness = [-v for v in vals] if key == "ranks" else vals  # higher is better
    pairs = []
    for i, j in combinations(range(len(responses)), 2):
        if goodness[i] == goodness[j]:
            stats["tied_pairs"] = stats.get("tied_pairs", 0) + 1
            continue
        if responses[i] == responses[j]:  # same text ranked differently: contradictory, no signal
            _duplicate(row, f"responses[{j}]", f"responses[{i}] and [{j}] are the same text, ranked differently",
                       stats)
            continue
        w, l = (i, j) if goodness[i] > goodness[j] else (j, i)
        pairs.append((w, l, 0.0))
    if not pairs and len(set(goodness)) == 1:  # every response tied (sampled: all right or all wrong)
        stats["all_tied_rows"] = stats.get("all_tied_rows", 0) + 1
        if stats["all_tied_rows"] == 1:
            log.info("%s: every response is ranked the same: the row is dropped (counted as all_tied_rows in "
                     "summary.json)", row.where(key))
    if not pairs:
        return None
    return PrefGroup(as_prompt_messages(prompt), responses, pairs, row.where(),
                     [f"responses[{i}]" for i in range(len(responses))])


def split_implicit_prompt(chosen, rejected, row: Row):
    """Split two transcripts that share a prefix into (prompt, chosen_response, rejected_response).

    Message lists: the prompt is the longest common prefix of whole messages, and must end
    before an assistant turn. Strings (Anthropic HH style "\\n\\nHuman: ... \\n\\nAssistant: ..."):
    the prompt runs to the end of the last "Assistant:" marker inside the common prefix; without
    one the two transcripts do not share a prompt and the row is an error (cutting at the last
    whitespace trained on prompts such as "What is "). A well-formed HH transcript becomes chat
    messages (:func:`hh_turns`), so every stage reads the same template; other text stays raw.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0 or n == len(chosen) or n == len(rejected):
            raise DataError(f"{row.where('chosen')}: chosen and rejected share no prompt prefix "
                            f"or one is a prefix of the other")
        while n > 0 and chosen[n - 1]["role"] == "assistant":  # the prompt ends before an assistant turn
            n -= 1
        if n == 0 or chosen[n - 1]["role"] not in ("user", "tool"):
            raise DataError(f"{row.where(f'chosen[{max(n - 1, 0)}].role')}: the shared prompt of chosen and "
                            f"rejected does not end on a user turn")
        for fld, reply in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
            _one_reply(row, fld, reply)
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        common = chosen[:n]
        marker = common.rfind("Assistant:")
        if marker < 0:  # cutting anywhere else would train on a cut prompt ("What is ")
            raise DataError(f"{row.where('chosen')}: chosen and rejected do not share their prompt: the text they "
                            f"have in common ({_clip(common)}) does not end in an 'Assistant:' turn marker; give "
                            f"'prompt' explicitly, or transcripts that differ only after the last 'Assistant:'")
        cut = marker + len("Assistant:")
        if cut >= len(chosen) or cut >= len(rejected):
            raise DataError(f"{row.where('chosen')}: chosen or rejected has no reply after the shared prompt")
        turns = hh_turns(chosen[:cut])
        if turns is not None:  # as messages: the RM and DPO read the chat template that SFT and PPO use
            for fld, reply in (("chosen", chosen[cut:]), ("rejected", rejected[cut:])):
                if "\n\nHuman:" in reply:
                    raise DataError(f"{row.where(fld)}: the reply after the shared prompt holds further turns "
                                    f"('Human:'); a preference compares one assistant reply")
            return turns, chosen[cut:].strip(), rejected[cut:].strip()
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise DataError(f"{row.where('chosen')}: chosen and rejected must both be strings or both messages")


def hh_turns(prompt: str) -> Messages | None:
    """An Anthropic HH transcript prompt ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:")
    as chat messages ending on the user's turn, or None when the text is not such a transcript
    (then it stays raw text). Without this an RM trained on HH reads raw transcripts, while PPO and
    SFT give it the chat template: text it never saw."""
    import re

    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    if parts[0].strip() or len(parts) < 5 or parts[-2] != "Assistant" or parts[-1].strip():
        return None
    pairs = list(zip(parts[1:-2:2], parts[2:-2:2]))  # every turn before the final, empty "Assistant:"
    roles = ["user" if who == "Human" else "assistant" for who, _ in pairs]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        return None
    return [{"role": r, "content": text.strip()} for r, (_, text) in zip(roles, pairs)]


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else "..." + text[-n:])


@dataclass
class PromptExample:
    prompt: Messages
    """The prompt as chat messages (a string prompt becomes one user message)."""
    meta: dict
    """The row's other fields (reward functions receive them)."""
    raw_prompt: str | Messages = ""
    """The prompt as the row gave it (what reward functions receive)."""


def parse_prompt(row: Row) -> PromptExample:
    p = text_or_messages(row, "prompt")
    messages = as_prompt_messages(p)
    check_turns(row, _turns("prompt", messages), ends_on=("user", "tool"))  # the assistant answers next
    return PromptExample(messages, _meta(row.data, ("prompt",)), p)


def _meta(d: dict, drop: tuple[str, ...]) -> dict:
    return {k: v for k, v in d.items() if k not in drop}


def parse_all(rows: list[Row], parser, skip_bad_rows: bool = False, what: str = "rows") -> tuple[list, dict]:
    """Apply `parser` to every row; returns (examples, stats). Bad rows raise unless skipped."""
    out, stats = [], {"rows": len(rows), "skipped_bad_rows": 0}
    for row in rows:
        try:
            ex = parser(row, stats) if parser is parse_preference else parser(row)
        except DataError as e:
            if not skip_bad_rows:
                raise
            stats["skipped_bad_rows"] += 1
            log.warning("skipping bad row: %s", e)
            continue
        if ex is not None:
            ex.where = row.where()
            out.append(ex)
    if stats["skipped_bad_rows"]:
        log.warning("skipped %d bad %s", stats["skipped_bad_rows"], what)
    if not out:
        src = rows[0].source if rows else "dataset"
        raise DataError(f"{src}: no usable {what}")
    return out, stats


def load_examples(spec: str | None, parser, *, split: str = "train", skip_bad_rows: bool = False,
                  max_samples: int | None = None, what: str = "rows", field_name: str = "data.train"):
    if not spec:
        raise DataError(f"recipe: '{field_name}' is not set")
    specs = [spec] if isinstance(spec, str) else list(spec)
    rows = []
    for i, s in enumerate(specs):
        try:
            rows += read_rows(s, split)
        except DataError as e:  # which of several files: its place in the list too
            raise (DataError(f"{field_name}[{i}]: {e}") if len(specs) > 1 else e) from None
    if not rows:
        raise DataError(f"{spec if isinstance(spec, str) else ', '.join(specs)}: empty dataset")
    if max_samples:
        rows = rows[:max_samples]
    return parse_all(rows, parser, skip_bad_rows, what)


def prompt_lines(text: str, source: str) -> list[Row]:
    """A plain-text prompt file: one user message per non-blank line, each row keeping its line."""
    return [Row({"prompt": [{"role": "user", "content": ln}]}, source, i)
            for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]


def load_prompts(spec: str, *, max_samples: int | None = None, field_name: str = "--prompts") -> list:
    """Prompts (:func:`parse_prompt`) from data rows (.jsonl, .json, .parquet, a folder, a hub
    dataset), or from a plain-text file of one prompt a line, as `rlhf generate` reads it."""
    from ..textio import read_text

    path = Path(spec)
    if not (path.is_file() and path.suffix not in _EXTS):
        return load_examples(spec, parse_prompt, max_samples=max_samples, what="prompts", field_name=field_name)[0]
    rows = prompt_lines(read_text(path, DataError), str(path))
    if not rows:
        raise DataError(f"{path}: no prompts in it (one prompt per line)")
    return parse_all(rows[:max_samples] if max_samples else rows, parse_prompt, what="prompts")[0]


def split_train_eval(examples: list, eval_split: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split (same seed -> same split)."""
    import random

    if not 0 <= eval_split < 1:
        raise DataError(f"recipe: 'data.eval_split' must be in [0, 1), got {eval_split}")
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = int(round(len(examples) * eval_split))
    if eval_split > 0:
        n_eval = max(n_eval, 1)
    if examples and n_eval == len(examples):  # (one row: it was held out, and "no training texts" followed)
        raise DataError(f"recipe: 'data.eval_split' ({eval_split}) holds out all {len(examples)} rows, leaving none "
                        f"to train on: add rows, give data.eval, or set data.eval_split: 0")
    ev = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in ev], [examples[i] for i in sorted(ev)]


def _join_id(r: Row):
    rid = r.data["id"]
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise DataError(f"{r.where('id')}: expected a string or an integer, got {rid!r}")
    return rid


def join_ranks(samples_path: str, ranks_path: str, out_path: str) -> int:
    """Join human ranks onto sampled responses by `id` -> K-way ranking rows (InstructGPT §3.4).

    samples: rows {id, prompt, responses, ...} (``rlhf sample --judge none``); ranks: rows {id,
    ranks} (1 = best) or {id, scores}. Every ranked id must exist and rank every response.
    """
    from .tasks import write_jsonl

    samples, where = {}, {}
    for r in read_rows(samples_path):
        if "id" not in r.data or "responses" not in r.data:
            raise DataError(f"{r.where('id')}: sample rows need 'id' and 'responses'")
        rid = _join_id(r)
        if rid in samples:  # (two sample files concatenated: both count from 0) ranks would join the wrong prompt
            raise DataError(f"{r.where('id')}: id {rid!r} again (first at line {where[rid]}): ids must be unique to "
                            f"join ranks to their samples")
        samples[rid], where[rid] = r.data, r.line
    out, ranked = [], {}
    for r in read_rows(ranks_path):
        if "id" not in r.data:
            raise DataError(f"{r.where('id')}: missing (each row ranks the sample row with this id)")
        rid = _join_id(r)
        if rid not in samples:
            other = str(rid) if not isinstance(rid, str) else int(rid) if rid.isascii() and rid.isdigit() else None
            hint = f" (but {other!r} is: the id's type differs)" if other is not None and other in samples else ""
            raise DataError(f"{r.where('id')}: id {rid!r} is not in {samples_path}{hint}")
        if rid in ranked:
            raise DataError(f"{r.where('id')}: id {rid!r} ranked again (first at line {ranked[rid]})")
        ranked[rid] = r.line
        key = "ranks" if "ranks" in r.data else "scores" if "scores" in r.data else None
        if key is None:
            raise DataError(f"{r.where('ranks')}: missing (give 'ranks' or 'scores')")
        if "ranks" in r.data and "scores" in r.data:  # one would be dropped without a word
            raise DataError(f"{r.where('scores')}: give exactly one of 'ranks' and 'scores'")
        row = {k: v for k, v in samples[rid].items() if k not in ("ranks", "scores")}
        row[key] = r.data[key]
        _parse_ranking(Row(row, r.source, r.line), {})  # validate the joined row now
        out.append(row)
    if not out:  # an empty file would write an empty ranking set (and a paused run would skip its round)
        raise DataError(f"{ranks_path}: no rank rows")
    if len(out) < len(samples):
        log.warning("%s: %d of the %d sample rows are ranked; the others are left out of %s", ranks_path, len(out),
                    len(samples), out_path)
    write_jsonl(out_path, out)
    return len(out)
