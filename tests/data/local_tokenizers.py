"""Tokenizers built locally for the data tests: the Llama 3, ChatML and Mistral special tokens and templates
over a byte-level BPE (trained here on a few sentences) or a word-level vocabulary."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from wrpo_nemo.data.templates import SPECIAL_TOKENS, TEMPLATES

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, the tide keeps its old promise.",
    "You are a helpful assistant. Answer briefly and correctly.",
    "Explain recursion: a function that calls itself until a base case stops it.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ? : ; - ( ) [ ] unicode é ü 東京",
]
WORDS = sorted(
    {w.strip(".,?!:;()") for line in CORPUS for w in line.split()} | {"Paris", "Rome", "no", "yes"}
)
FAMILIES = ("llama3", "chatml", "mistral")


def build_bpe_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2/Llama 3 style) with ``family``'s special tokens and chat template."""
    special = SPECIAL_TOKENS[family]
    specials = ["<pad>"] + [t for t in (special["bos"], special["eos"]) if t] + special["extra"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special["bos"],
        eos_token=special["eos"],
        pad_token="<pad>",
        additional_special_tokens=[t for t in specials if t != "<pad>"],
    )
    tokenizer.chat_template = TEMPLATES[family]
    return tokenizer
