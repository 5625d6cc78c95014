"""Tiny random causal LMs (GPT-2, BLOOM, OPT, Llama families) with a locally trained byte-level BPE tokenizer.

For tests and for trying the pipeline without any download: a model of about 100k parameters saved as a plain
`from_pretrained` folder.
"""
from __future__ import annotations

from pathlib import Path

ARCHITECTURES = ("gpt2", "bloom", "opt", "llama")

_CORPUS = """\
Tweet text : my flight was cancelled again and nobody at the desk can help Label : complaint
Tweet text : thank you for the quick reply , have a great day Label : no complaint
Tweet text : the app keeps crashing every time I open it , fix this please Label : complaint
Tweet text : loving the new menu at the store today Label : no complaint
Tweet text : still waiting for my refund after three weeks Label : complaint
Tweet text : happy birthday to the best team in town Label : no complaint
The game began development in 2010 , carrying over a large portion of the work done on the previous game .
Query : how do I activate my card Label : activate_my_card
review : the room was clean and the staff were friendly , 房间很干净 , 服务很好 .
"""


def build_tokenizer(vocab_size: int = 320, files: list | None = None):
    """A byte-level BPE of `vocab_size` tokens, trained on a small built-in corpus, or on `files` (text files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<s>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if files:
        tok.train([str(f) for f in files], trainer=trainer)
    else:
        tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>", pad_token="<pad>",
                                   unk_token=None)


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4):
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=0, pad_token_id=2)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **common)
    if arch == "bloom":
        return tf.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden, num_attention_heads=heads,
                            max_position_embeddings=512, word_embed_proj_dim=hidden, **common)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=512, **common)
    raise ValueError(f"unknown tiny architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")


# The special tokens of the ChatML and Llama 3 chat templates, for a tiny chat model.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def build_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, chat: bool = False) -> Path:
    """Write a random tiny model and its tokenizer to `out_dir` (a plain from_pretrained folder). `chat`: the
    tokenizer also has the chat templates' special tokens and ChatML as its own chat template."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from peft_tuner.data.chat import BUILTIN_TEMPLATES

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
        tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer))
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=0, pad_token_id=2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_bert_vocab_gpt2(out_dir: str | Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny random GPT-2 whose tokenizer is a BERT character vocabulary over `texts`, laid out as the Chinese GPT-2
    models ship (uer/gpt2-chinese-cluecorpussmall): vocab.txt and a BertTokenizer config with [CLS]/[SEP]/[PAD] and no
    EOS; the model config keeps GPT-2's default token ids."""
    import json

    import torch
    import transformers as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    characters = sorted({c for text in texts for c in text if not c.isspace()} | set("0123456789abcdefghijklmnopqrstuvwxyz"))
    vocab = BERT_SPECIALS + characters
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    torch.manual_seed(seed)
    config = tf.GPT2Config(vocab_size=len(vocab), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                           tokenizer_class="BertTokenizer")
    tf.GPT2LMHeadModel(config).save_pretrained(out)
    return out
