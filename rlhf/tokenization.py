"""One chat-template path for SFT, RM and PPO.

A prompt is tokenized exactly as generation sees it (``apply_chat_template(...,
add_generation_prompt=True)``); a response is the rest of the rendered conversation, cut after
its EOS. Training on ``prompt_ids + response_ids`` therefore matches what the policy samples,
and the RM reads the same ``prompt + response + EOS`` in training and in PPO [N].

Raw-text prompts (implicit-prompt transcripts such as Anthropic HH) skip the template: the
sequence is ``prompt + response + EOS`` as text.

Text is encoded with ``add_special_tokens=False`` (a template writes its own special tokens), so
a tokenizer that puts BOS before every encoding (Llama-2, Mistral) would lose it wherever the
template does not write it (the default template, a raw-text prompt): :func:`encode_prompt`
puts it back, once, as ``tok(text)`` would.
"""

from __future__ import annotations

from .errors import TemplateError
from .data.formats import Messages

IGNORE_INDEX = -100


def _render(tok, messages: Messages, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def adds_bos(tok) -> bool:
    """Whether `tok` puts its BOS token before an encoding of plain text (``tok(text)``), as Llama-2's
    and Mistral's tokenizers do; asked of the tokenizer's own post-processing, not of an attribute
    (transformers' fast tokenizers do not all carry ``add_bos_token``)."""
    bos = tok.bos_token_id
    if bos is None:
        return False
    try:
        with_special = tok("a")["input_ids"]
    except (TypeError, ValueError):
        return False
    return with_special[:1] == [bos] and _ids(tok, "a")[:1] != [bos]


def encode_prompt(tok, prompt: Messages | str) -> list[int]:
    """Token ids of the prompt up to where the assistant starts writing, behind BOS when the
    tokenizer puts BOS before every encoding and the template (or raw text) did not write it."""
    ids = _ids(tok, prompt) if isinstance(prompt, str) else _ids(tok, _render(tok, prompt, add_generation_prompt=True))
    if ids[:1] != [tok.bos_token_id] and adds_bos(tok):
        ids = [tok.bos_token_id] + ids
    return ids


def _cut_after_eos(ids: list[int], eos: int) -> list[int]:
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    return ids + [eos]


def encode_response(tok, prompt: Messages | str, response: Messages | str) -> list[int]:
    """Token ids of one assistant reply as the template renders it after `prompt`, ending with EOS."""
    eos = tok.eos_token_id
    if isinstance(prompt, str):
        text = response if isinstance(response, str) else "".join(m["content"] for m in response)
        return _cut_after_eos(_ids(tok, text), eos)
    msgs = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    pre = _render(tok, prompt, add_generation_prompt=True)
    full = _render(tok, prompt + msgs[:1], add_generation_prompt=False)
    if not full.startswith(pre):
        raise TemplateError("the chat template does not render the prompt as a prefix of prompt + reply")
    return _cut_after_eos(_ids(tok, full[len(pre):]), eos)


def encode_sft(tok, prompt: Messages | str, completion: Messages) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a demonstration; labels are IGNORE_INDEX except on assistant turns.

    Each turn is tokenized as the difference between successive renderings of the conversation,
    so the prompt tokens are exactly those of :func:`encode_prompt`. An assistant turn is learnt
    up to and including its EOS; anything the template adds after the EOS (e.g. a newline) and
    every non-assistant turn carry no loss. A template that ends turns with another token than EOS
    gets EOS after the last assistant turn only (earlier turns stay as the template renders them,
    which is how a multi-turn PPO or evaluation prompt reads).
    """
    eos = tok.eos_token_id
    ids = encode_prompt(tok, prompt)
    labels = [IGNORE_INDEX] * len(ids)
    if isinstance(prompt, str):
        resp = encode_response(tok, prompt, completion)
        return ids + resp, labels + resp
    history = list(prompt)
    rendered = _render(tok, history, add_generation_prompt=True)
    last = max((i for i, m in enumerate(completion) if m["role"] == "assistant"), default=-1)
    for i, msg in enumerate(completion):
        if msg["role"] == "assistant":
            pre = _render(tok, history, add_generation_prompt=True)
            if not pre.startswith(rendered) and rendered != pre:
                raise TemplateError("the chat template re-renders earlier turns differently")
            gap = pre[len(rendered):] if pre.startswith(rendered) else ""
            if gap:
                g = _ids(tok, gap)
                ids += g
                labels += [IGNORE_INDEX] * len(g)
            full = _render(tok, history + [msg], add_generation_prompt=False)
            if not full.startswith(pre):
                raise TemplateError("the chat template does not render the prompt as a prefix of prompt + reply")
            seg = _ids(tok, full[len(pre):])
            if eos in seg:
                k = seg.index(eos) + 1
                learn, rest = seg[:k], seg[k:]
            else:  # a template whose turns end with another token: EOS ends the last reply only, so earlier
                learn, rest = seg + ([eos] if i == last else []), []  # turns read as a PPO prompt renders them
            ids += learn + rest
            labels += learn + [IGNORE_INDEX] * len(rest)
            history.append(msg)
            rendered = full
        else:
            history.append(msg)
            nxt = _render(tok, history, add_generation_prompt=False)
            if not nxt.startswith(rendered):
                # the template's generation prompt differs from a rendered assistant header; re-anchor
                base = _render(tok, history[:-1], add_generation_prompt=False)
                seg_text = nxt[len(base):] if nxt.startswith(base) else nxt
            else:
                seg_text = nxt[len(rendered):]
            seg = _ids(tok, seg_text)
            ids += seg
            labels += [IGNORE_INDEX] * len(seg)
            rendered = nxt
    return ids, labels


def decode_response(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def encode_scored(tok, prompt: Messages | str, response: Messages | str) -> list[int]:
    """The sequence a reward model reads: prompt + response + EOS, behind [CLS] for encoders
    whose classifier pools the first token (BERT-style tokenizers have a cls_token)."""
    ids = encode_prompt(tok, prompt) + encode_response(tok, prompt, response)
    cls = getattr(tok, "cls_token_id", None)
    if cls is not None and (not ids or ids[0] != cls):
        ids = [cls] + ids
    return ids


def collate_sft(feats: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple:
    """Right-padded (ids, attention mask, labels), each (B, T), of encoded demonstrations."""
    from .rollout import right_pad

    ids = right_pad([f[0] for f in feats], pad_id, device)
    labels = right_pad([f[1] for f in feats], IGNORE_INDEX, device)
    mask = right_pad([[1] * len(f[0]) for f in feats], 0, device)
    return ids, mask, labels
