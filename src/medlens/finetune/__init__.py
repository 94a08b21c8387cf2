"""Fine-tuning: LoRA / QLoRA of MedGemma on TRL's SFT trainer over the same input recipe as evaluation,
MedSigLIP contrastive fine-tuning, and the train/held-out leakage guard (``medlens overlap``).

A consumer like eval, siglip and serve: it imports only from the layers below and never from another
consumer. torch, transformers, peft and trl are imported inside the functions that train.
"""
