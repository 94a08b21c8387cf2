"""The built-in ``test-tiny`` model: the real Gemma 3 multimodal architecture with tiny random weights.

It is built offline (tokenizer trained on a small built-in corpus, weights from a fixed seed), saved with
``save_pretrained`` into the medlens cache and then loaded through the same ``from_pretrained`` path as
real MedGemma weights. Its answers are noise; it exists to test the plumbing quickly on a CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medlens.models.cache import build_once, models_dir

#: bump when anything below changes what gets built; the cache directory name carries it
TINY_VERSION = 1
TINY_NAME = "test-tiny"
SEED = 20250101
DEFAULT_MAX_NEW_TOKENS = 16

# Vision tower: 112 px / 14 px patches = 8x8 patches, pooled 4x4 -> 2x2 = 4 tokens per image.
IMAGE_SIZE = 112
PATCH_SIZE = 14
MM_TOKENS_PER_IMAGE = 4

# Fixed ids, in the same order as the real Gemma 3 vocabulary starts (pad, eos, bos, unk).
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<unused94>",
    "<unused95>",
]
# As in Gemma 3, the thinking markers are added but not "special": they survive skip_special_tokens.
NON_SPECIAL = {"<unused94>", "<unused95>"}
BPE_VOCAB_SIZE = 320

CORPUS = """\
You are an expert radiologist. Describe the findings in this chest X-ray.
Is there "pleural effusion" in the CT volume? Answer with "Final Answer: yes" or "Final Answer: no".
Final Answer: yes. Final Answer: no. The answer is yes. The answer is no.
SLICE 1 SLICE 2 SLICE 3 SLICE 4 SLICE 5 SLICE 6 SLICE 7 SLICE 8 SLICE 9 SLICE 10
The lungs are clear. No pneumothorax. The heart size is normal. Mild cardiomegaly.
There is a small left pleural effusion with adjacent atelectasis of the left lower lobe.
Findings: no acute intracranial hemorrhage. Impression: normal study.
The liver, spleen, kidneys and pancreas are unremarkable. A 5 mm nodule in the right upper lobe.
Consolidation in the right lower lobe consistent with pneumonia. Interval improvement since the prior.
Compared with the prior image, the opacity is improved, stable or worsened.
The patient's left is on the right of the image. Boxes are [y0, x0, y1, x1] normalised to 0..1000.
[{"box_2d": [120, 340, 560, 780], "label": "left lung"}, {"box_2d": [90, 80, 540, 320], "label": "right"}]
Hemoglobin 13.5 g/dL (12.0-16.0). White blood cell count 7.2 x10^9/L. Glucose 98 mg/dL fasting.
Histopathology: invasive ductal carcinoma, grade 2. Tissue: breast. Procedure: core needle biopsy.
MRI brain: no restricted diffusion. T2 hyperintense lesion in the periventricular white matter.
SYSTEM INSTRUCTION: think silently if needed. Let me think step by step about the question.
What is the most likely diagnosis? Which organ is abnormal? Where is the lesion located?
A. pneumonia B. edema C. atelectasis D. normal. The correct option is B.
"""

# Gemma turn format, written for medlens: a system message is prepended to the first user turn,
# images render as <start_of_image> (the processor expands them), text parts are trimmed and joined.
CHAT_TEMPLATE = r"""
{%- macro render(content) -%}
{%- if content is string -%}{{ content | trim }}
{%- else -%}{%- for part in content -%}
{%- if part['type'] == 'image' -%}<start_of_image>
{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}
{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set prefix = render(messages[0]['content']) + '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set prefix = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + render(message['content']) -}}
{{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""


def tiny_model_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """Where the tiny model lives: ``$MEDLENS_CACHE/models/test-tiny-v<N>``."""
    return models_dir(cache) / f"{TINY_NAME}-v{TINY_VERSION}"


def ensure_tiny_model(cache: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory of the tiny model, building it atomically on first use."""
    return build_once(tiny_model_dir(cache), save_tiny_model)


def save_tiny_model(directory: str | os.PathLike[str]) -> None:
    """Build the tokenizer, processor and model and ``save_pretrained`` them into ``directory``."""
    from medlens.models.hf import save_built

    processor = build_processor()
    model = build_model(processor.tokenizer)
    info = {
        "name": TINY_NAME,
        "version": TINY_VERSION,
        "is_test_model": True,
        "default_max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
    }
    save_built(Path(directory), (model, processor), info)


def build_tokenizer() -> Any:
    """A small byte-fallback BPE tokenizer trained on :data:`CORPUS`, as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    def pipeline(tok: Tokenizer) -> Tokenizer:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        return tok

    trainer = BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False, special_tokens=[])
    learner = pipeline(Tokenizer(models.BPE()))
    learner.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    learned = json.loads(learner.to_str())["model"]

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tok = pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)))
    tok.add_special_tokens([AddedToken(t, special=t not in NON_SPECIAL, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )


def build_processor() -> Any:
    """``Gemma3Processor`` with the tiny tokenizer, an image processor sized to the tiny vision tower."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # bilinear, as MedGemma's preprocessor_config.json
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )


def build_model(tokenizer: Any) -> Any:
    """``Gemma3ForConditionalGeneration`` with tiny dimensions and weights drawn from a fixed seed."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GenerationConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "max_position_embeddings": 4096,
        "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention"],
        "pad_token_id": ids["<pad>"],
        "eos_token_id": ids["<eos>"],
        "bos_token_id": ids["<bos>"],
    }
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "vision_use_head": False,
    }
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        pad_token_id=ids["<pad>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        bos_token_id=ids["<bos>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Gemma3ForConditionalGeneration(config)
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():  # zero-initialised upstream: random here, so the images change the answer
            projector.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        pad_token_id=ids["<pad>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        do_sample=False,
    )
    return model.eval()
