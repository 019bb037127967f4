"""Tiny random configs of the architectures layerfuse supports, with a base model and a model with a head;
encoder-decoders with two stacks of different depths."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    vocab_size=99,
    max_position_embeddings=64,
)

ARCHITECTURES = {
    "bert": (tf.BertConfig, tf.BertModel, tf.BertForSequenceClassification, {}),
    "roberta": (tf.RobertaConfig, tf.RobertaModel, tf.RobertaForMaskedLM, {"pad_token_id": 1}),
    "xlm-roberta": (
        tf.XLMRobertaConfig,
        tf.XLMRobertaModel,
        tf.XLMRobertaForSequenceClassification,
        {"pad_token_id": 1},
    ),
    "distilbert": (
        tf.DistilBertConfig,
        tf.DistilBertModel,
        tf.DistilBertForMaskedLM,
        dict(dim=32, n_layers=3, n_heads=4, hidden_dim=37),
    ),
    "albert": (tf.AlbertConfig, tf.AlbertModel, tf.AlbertForSequenceClassification, dict(embedding_size=16)),
    "electra": (tf.ElectraConfig, tf.ElectraModel, tf.ElectraForMaskedLM, dict(embedding_size=16)),
    "deberta-v2": (tf.DebertaV2Config, tf.DebertaV2Model, tf.DebertaV2ForSequenceClassification, {}),
    "modernbert": (
        tf.ModernBertConfig,
        tf.ModernBertModel,
        tf.ModernBertForMaskedLM,
        dict(
            global_attn_every_n_layers=2,
            local_attention=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
    ),
    "gpt2": (
        tf.GPT2Config,
        tf.GPT2Model,
        tf.GPT2LMHeadModel,
        dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    ),
    "llama": (
        tf.LlamaConfig,
        tf.LlamaModel,
        tf.LlamaForCausalLM,
        dict(num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    ),
    "mistral": (
        tf.MistralConfig,
        tf.MistralModel,
        tf.MistralForCausalLM,
        dict(num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    ),
    "qwen2": (
        tf.Qwen2Config,
        tf.Qwen2Model,
        tf.Qwen2ForCausalLM,
        dict(num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    ),
    "mpnet": (tf.MPNetConfig, tf.MPNetModel, tf.MPNetForMaskedLM, {"pad_token_id": 1}),
    "esm": (
        tf.EsmConfig,
        tf.EsmModel,
        tf.EsmForMaskedLM,
        dict(pad_token_id=1, mask_token_id=3, position_embedding_type="rotary"),
    ),
    "gemma": (
        tf.GemmaConfig,
        tf.GemmaModel,
        tf.GemmaForCausalLM,
        dict(num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    ),
    "phi3": (
        tf.Phi3Config,
        tf.Phi3Model,
        tf.Phi3ForCausalLM,
        dict(num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    ),
    "qwen3": (
        tf.Qwen3Config,
        tf.Qwen3Model,
        tf.Qwen3ForCausalLM,
        dict(num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    ),
    "gpt_neox": (
        tf.GPTNeoXConfig,
        tf.GPTNeoXModel,
        tf.GPTNeoXForCausalLM,
        dict(bos_token_id=1, eos_token_id=2, pad_token_id=0),
    ),
}
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "gemma", "phi3", "qwen3", "gpt_neox")


def build(name: str, head: bool = False, seed: int = 0):
    config_class, base_class, head_class, extra = ARCHITECTURES[name]
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **extra})
    return (head_class if head else base_class)(config).eval()


ENCODER_DECODERS = {
    "t5": (
        tf.T5Config,
        tf.T5Model,
        tf.T5ForConditionalGeneration,
        dict(d_model=32, d_kv=8, d_ff=37, num_layers=3, num_decoder_layers=2, num_heads=4, vocab_size=99),
    ),
    "bart": (
        tf.BartConfig,
        tf.BartModel,
        tf.BartForConditionalGeneration,
        dict(
            d_model=32,
            encoder_layers=3,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            vocab_size=99,
            max_position_embeddings=64,
        ),
    ),
}


def build_encoder_decoder(name: str, head: bool = False, seed: int = 0):
    config_class, base_class, head_class, arguments = ENCODER_DECODERS[name]
    torch.manual_seed(seed)
    return (head_class if head else base_class)(config_class(**arguments)).eval()
