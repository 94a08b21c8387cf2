"""From medlens chat messages to what an engine reads, and back: the prompt text (a model's chat template, or
the Gemma turn format when it has none), the image parts as RGB PIL images or lossless PNG data URLs, the
OpenAI message format, and a completion cleaned of end markers. Every engine renders through here, so the
same messages give the same prompt on transformers, vLLM, llama.cpp and a server.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np

from medlens.chat import Messages
from medlens.errors import MedlensError

#: tokens removed from a completion; ``<unused94>``/``<unused95>`` (thinking markers) are kept
DROPPED_TOKENS = ("<eos>", "<end_of_turn>", "<pad>", "<bos>")
_DROPPED_RE = re.compile("|".join(re.escape(t) for t in DROPPED_TOKENS))
#: the tokens that end a Gemma answer
END_TOKENS = ("<eos>", "<end_of_turn>")


def clean_completion(text: str) -> str:
    """Drop end/padding markers and trailing whitespace; keep everything else, thinking markers included."""
    return _DROPPED_RE.sub("", text).rstrip()


def to_pil(image: Any) -> Any:
    """An RGB uint8 array (or a PIL image) as an RGB PIL image, pixel for pixel (no lossy encoding)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))):
        raise MedlensError(
            f"image parts must be RGB uint8 arrays (H x W x 3); got {array.dtype} with shape {array.shape}"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    pil = Image.fromarray(np.ascontiguousarray(array))
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def gemma_chat_prompt(messages: Messages, bos: str = "<bos>") -> str:
    """The Gemma turn format, for tokenizers without a chat template. As Gemma 3's own template: a system
    message opens the first user turn, text parts are trimmed and joined, the prompt ends with the model turn."""
    turns, system = list(messages), ""
    if turns and turns[0].get("role") == "system":
        system = message_text(turns.pop(0)) + "\n\n"
    prompt = [bos]
    for n, message in enumerate(turns):
        role = "model" if message.get("role") == "assistant" else str(message.get("role"))
        prompt.append(f"<start_of_turn>{role}\n{system if n == 0 else ''}{message_text(message)}<end_of_turn>\n")
    prompt.append("<start_of_turn>model\n")
    return "".join(prompt)


def message_text(message: dict[str, Any]) -> str:
    """A message's text as Gemma 3's template writes it: each text part trimmed, joined without a separator."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content.strip()
    return "".join(p["text"].strip() for p in content if isinstance(p, dict) and p.get("type") == "text")


def image_parts(messages: Messages) -> list[Any]:
    """The images of the messages' image parts, in prompt order."""
    found = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image":
                if part.get("image") is None:
                    raise MedlensError("an image part has no 'image' array")
                found.append(part["image"])
    return found


def render_prompt(processor: Any, tokenizer: Any, messages: Messages) -> str:
    """The prompt text: the processor's chat template (multimodal models); for text-only models the
    tokenizer's, else :func:`gemma_chat_prompt`. It starts with ``<bos>``."""
    if processor is not None:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return gemma_chat_prompt(messages, tokenizer.bos_token or "")


def openai_messages(messages: Messages, images: bool = True) -> list[dict[str, Any]]:
    """medlens messages in the OpenAI chat format. Image parts become PNG data URLs (dropped when not
    ``images``); a message with text parts only becomes one string, joined as Gemma's template joins them
    (some servers, llama-cpp-python's among them, drop list content when they render prompts themselves)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            has_image = images and any(part.get("type") == "image" for part in content)
            if not has_image:
                content = message_text(message)
            else:
                content = [
                    {"type": "image_url", "image_url": {"url": png_data_url(part["image"])}}
                    if part.get("type") == "image"
                    else {"type": "text", "text": part.get("text", "")}
                    for part in content
                ]
        out.append({"role": message["role"], "content": content})
    return out


def png_data_url(image: Any) -> str:
    """An RGB uint8 array (or a PIL image) as a lossless ``data:image/png;base64,...`` URL (fast compression)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
