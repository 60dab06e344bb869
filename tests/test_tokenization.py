"""Tokenizer training, chat template, and the SFT loss mask on hand-built examples."""


from rlhf.models import DEFAULT_CHAT_TEMPLATE, prepare_tokenizer
from rlhf.tokenization import IGNORE_INDEX, encode_prompt, encode_response, encode_sft


def test_trained_tokenizer_has_distinct_pad_eos_and_template(tok):
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE and tok.padding_side == "left"
    ids = tok("Sort the digits: 31415", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Sort the digits: 31415"
    digits = tok("31415", add_special_tokens=False)["input_ids"]
    assert len(digits) == 5  # one token per digit


def test_chat_template_renders_turns():
    from rlhf.models import train_tokenizer

    t = train_tokenizer(["hello world", "abc"], vocab_size=280)
    text = t.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                 tokenize=False)
    assert text == "<|user|>hi<|assistant|>yo<|endoftext|>"
    gen = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert gen == "<|user|>hi<|assistant|>"


def test_prepare_tokenizer_adds_pad_when_pad_is_eos(tok):
    import copy

    t = copy.deepcopy(tok)
    t.pad_token = t.eos_token
    t.chat_template = None
    t = prepare_tokenizer(t)
    assert t.pad_token_id != t.eos_token_id and t.chat_template == DEFAULT_CHAT_TEMPLATE


def test_sft_mask_prompt_tokens_carry_no_loss(tok):
    prompt = [{"role": "user", "content": "Sort the digits: 321"}]
    completion = [{"role": "assistant", "content": "123"}]
    ids, labels = encode_sft(tok, prompt, completion)
    p_ids = encode_prompt(tok, prompt)
    assert ids[: len(p_ids)] == p_ids
    assert labels[: len(p_ids)] == [IGNORE_INDEX] * len(p_ids)
    learnt = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tok.decode(learnt[:-1]) == "123" and learnt[-1] == tok.eos_token_id
    assert learnt == encode_response(tok, prompt, "123")
    # the loss mask written out by hand for this template: "<|user|>...<|assistant|>" | "1" "2" "3" EOS
    assert labels == [IGNORE_INDEX] * len(p_ids) + ids[len(p_ids):]


def test_sft_mask_multi_turn_only_assistant_turns(tok):
    prompt = [{"role": "user", "content": "a"}]
    completion = [{"role": "assistant", "content": "1"}, {"role": "user", "content": "b"},
                  {"role": "assistant", "content": "2"}]
    ids, labels = encode_sft(tok, prompt, completion)
    learnt = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tok.decode(learnt, skip_special_tokens=True) == "12"
    assert learnt.count(tok.eos_token_id) == 2
    full = tok.apply_chat_template(prompt + completion, tokenize=False)
    assert tok.decode(ids) == full  # the pieces add up to the whole conversation


def test_raw_text_prompt(tok):
    ids, labels = encode_sft(tok, "Sort the digits: 21 ->", [{"role": "assistant", "content": " 12"}])
    learnt = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tok.decode(learnt) == " 12" + tok.eos_token


def test_a_template_ending_turns_without_eos_gets_eos_after_the_last_reply_only(tok):
    """Qwen-style: turns end with their own marker, EOS is another token. A multi-turn
    demonstration learns EOS after its last reply only; the earlier turns read exactly as the
    template renders them, which is how a multi-turn PPO or evaluation prompt reads them."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '|' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    prompt = [{"role": "user", "content": "a"}]
    completion = [{"role": "assistant", "content": "1"}, {"role": "user", "content": "b"},
                  {"role": "assistant", "content": "2"}]
    ids, labels = encode_sft(t, prompt, completion)
    assert ids.count(t.eos_token_id) == 1 and ids[-1] == t.eos_token_id
    history = prompt + completion[:2]  # the second reply's context, as a PPO prompt would render it
    assert ids[: len(encode_prompt(t, history))] == encode_prompt(t, history)


def _bos_tokenizer(template: str | None = None):
    """A Llama-2-style tokenizer: its post-processor puts <s> before every encoding, and it has no
    `add_bos_token` attribute set (as transformers' fast tokenizers built from a tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["hello world 123"], trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 0)])
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>"), template)


def test_a_tokenizer_that_adds_bos_keeps_it_once_in_every_encoding():
    """Encoding with add_special_tokens=False dropped the BOS that Llama-2/Mistral tokenizers put
    before every text when the template does not write it (the default template, raw text)."""
    from rlhf.tokenization import adds_bos, encode_scored

    t = _bos_tokenizer()
    bos = t.bos_token_id
    assert adds_bos(t) and t("hi")["input_ids"][0] == bos
    prompt, reply = [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}]
    p = encode_prompt(t, prompt)
    assert p[0] == bos and p.count(bos) == 1
    assert p == t(t.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))["input_ids"]
    ids, labels = encode_sft(t, prompt, reply)
    assert ids[: len(p)] == p and ids.count(bos) == 1 and labels[0] == IGNORE_INDEX
    assert encode_scored(t, prompt, "yo")[: len(p)] == p
    raw = encode_prompt(t, "hello")
    assert raw == t("hello")["input_ids"] and raw[0] == bos
    # a template that writes BOS itself (Llama-3, Gemma, Mistral's): still exactly one
    own = _bos_tokenizer("{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE)
    q = encode_prompt(own, prompt)
    assert q[0] == bos and q.count(bos) == 1 and q == p


def test_tokenizers_without_bos_on_encode_are_left_as_they_were(tok):
    from rlhf.tokenization import adds_bos

    assert not adds_bos(tok)
    prompt = [{"role": "user", "content": "hi"}]
    assert encode_prompt(tok, prompt) == tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                                             add_special_tokens=False)["input_ids"]
