"""The chat message format shared by prompts (which build it) and backends (which consume it)."""

from __future__ import annotations

from typing import Any

# Hugging Face chat format. Image parts carry the prepared RGB uint8 array itself:
# {"role": "user", "content": [{"type": "text", "text": "..."}, {"type": "image", "image": ndarray}]}
Messages = list[dict[str, Any]]
