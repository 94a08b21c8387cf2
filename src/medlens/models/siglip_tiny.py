"""The built-in ``test-tiny-siglip`` model: the real SigLIP architecture (MedSigLIP's) with tiny random weights.

Built offline: a small BPE tokenizer trained on a built-in corpus, weights drawn from a fixed seed, both
saved with ``save_pretrained`` into the medlens cache, then loaded through the same ``from_pretrained`` path
as real MedSigLIP weights. Images are real 448 px inputs (64 px patches, so 7 x 7 of them). Its outputs are
noise; it exists to test the plumbing quickly on a CPU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from medlens.models.builtins import TINY_SIGLIP_WARNING
from medlens.models.cache import build_once, models_dir

#: bump when anything below changes what gets built; the cache directory name carries it
TINY_SIGLIP_VERSION = 1
TINY_SIGLIP_NAME = "test-tiny-siglip"
SEED = 20250448

IMAGE_SIZE = 448  # as MedSigLIP
PATCH_SIZE = 64  # MedSigLIP uses 14; 64 keeps the tiny tower fast at the real input size
HIDDEN_SIZE = 32
TEXT_POSITIONS = 64  # as MedSigLIP: text is padded to 64 tokens
BPE_VOCAB_SIZE = 300
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
# SigLIP's initial temperature and bias (Zhai et al. 2023): logits = exp(log 10) * cos - 10
LOGIT_SCALE_INIT = math.log(10.0)
LOGIT_BIAS_INIT = -10.0

CORPUS = """\
a chest x-ray showing pneumonia. a chest x-ray with no acute findings. a normal chest radiograph.
pleural effusion in the left lung. cardiomegaly. pneumothorax. atelectasis. consolidation. edema.
a ct slice of the abdomen. the liver, spleen and kidneys are unremarkable. a lesion in the liver.
a histopathology image of breast tissue. invasive ductal carcinoma. benign tissue. tumor. normal tissue.
a dermatology photograph of a melanoma. a benign nevus. a fundus photograph with diabetic retinopathy.
an mri of the brain. no acute intracranial hemorrhage. a fracture of the wrist. no fracture.
"""


def tiny_siglip_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """Where the tiny model lives: ``$MEDLENS_CACHE/models/test-tiny-siglip-v<N>``."""
    return models_dir(cache) / f"{TINY_SIGLIP_NAME}-v{TINY_SIGLIP_VERSION}"


def ensure_tiny_siglip(cache: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory of the tiny model, building it atomically (temp dir + rename) on first use."""
    return build_once(tiny_siglip_dir(cache), save_tiny_siglip)


def save_tiny_siglip(directory: str | os.PathLike[str]) -> None:
    """Build the tokenizer and the model and ``save_pretrained`` both into ``directory``."""
    from medlens.models.hf import save_built

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    info = {
        "name": TINY_SIGLIP_NAME,
        "version": TINY_SIGLIP_VERSION,
        "is_test_model": True,
        "warning": TINY_SIGLIP_WARNING,
    }
    save_built(Path(directory), (model, tokenizer), info)


def build_tokenizer() -> Any:
    """A small lower-casing BPE tokenizer trained on :data:`CORPUS` that ends every text with ``</s>`` (as
    SigLIP's does), wrapped as a transformers fast tokenizer with ``<pad>`` as its padding token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = BpeTrainer(vocab_size=BPE_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TEXT_POSITIONS,
    )


def build_model(tokenizer: Any) -> Any:
    """``SiglipModel`` with tiny towers (hidden size 32, 2 layers) and weights drawn from a fixed seed."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    tower = {"hidden_size": HIDDEN_SIZE, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text_config = {
        **tower,
        **ids,
        "bos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": TEXT_POSITIONS,
    }
    vision_config = {**tower, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}
    config = SiglipConfig(text_config=text_config, vision_config=vision_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE_INIT)
        model.logit_bias.fill_(LOGIT_BIAS_INIT)
    return model.eval()
