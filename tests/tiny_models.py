"""Tiny transformers models built from configs in a test (no download): a BERT with a word-piece vocabulary
and a Llama with a trained byte-level BPE, each with a base and 'fine-tunes' saved as users save them."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("good great fine happy love nice bad awful sad hate poor worst the a movie film food service was is it "
         "very not so and but i we they this that").split()
CORPUS = ["the movie was very good", "the food was awful", "i love this film", "we hate the service",
          "it is so nice", "this is the worst", "a happy day", "a sad story", "they were fine", "not good at all",
          "the cat sat on the mat", "the dog ran in the park", "a bird sang a song", "the sun is warm today"]


def bert_tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **extra)


def tiny_bert_family(root: Path, tasks: dict[str, list[str]], seed: int = 0, spread: float = 0.05):
    """A base BertModel (with tokenizer) and one BertForSequenceClassification per task whose encoder is the
    base plus noise; returns (base dir, {task: fine-tune dir})."""
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    base_dir = root / "base"
    bert_tokenizer(base_dir)
    base = BertModel(bert_config())
    base.save_pretrained(base_dir)
    out = {}
    for i, (task, classes) in enumerate(tasks.items()):
        config = bert_config(num_labels=len(classes), id2label=dict(enumerate(classes)),
                             label2id={c: k for k, c in enumerate(classes)})
        model = BertForSequenceClassification(config)
        g = torch.Generator().manual_seed(seed * 100 + i)
        model.bert.load_state_dict({k: v + spread * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                                    for k, v in base.state_dict().items()})
        out[task] = root / f"ft-{task}"
        model.save_pretrained(out[task])
    return base_dir, out


def llama_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


def tiny_llama_family(root: Path, n_models: int = 2, seed: int = 0, spread: float = 0.02, tie: bool = True):
    """A LlamaForCausalLM base (with tokenizer, tied embeddings) and n perturbed copies; (base dir, [dirs])."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base_dir = root / "llama-base"
    tokenizer = llama_tokenizer(base_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base = LlamaForCausalLM(config)
    base.save_pretrained(base_dir)
    dirs = []
    for i in range(n_models):
        model = LlamaForCausalLM(config)
        g = torch.Generator().manual_seed(seed * 100 + i + 1)
        model.load_state_dict({k: v + spread * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                               for k, v in base.state_dict().items()})
        if tie:
            model.tie_weights()
        path = root / f"llama-ft{i}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return base_dir, dirs
