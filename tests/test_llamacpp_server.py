"""llama.cpp and medlens: a real OpenAI-compatible server (``python -m llama_cpp.server`` on loopback) through
medlens's OpenAI backend, and the in-process ``llamacpp`` engine, both running the built-in gemma-3-270m GGUF
(Q4_K_M), compared with each other and with the transformers engine (the same file dequantised to float32).

Tests that need llama-cpp-python are skipped with the reason without it (``make llamacpp`` installs it).

Parity, measured on the 2-core CPU VM (llama-cpp-python 0.3.36, AVX2 build; torch 2.13 float32), 5 prompts x 32
greedy tokens:
- Prompt token ids: identical in all three when the content is a string (e.g. 14 ids for "The capital of France
  is"). llama-cpp-python's server with ``--chat_format gemma`` (the file has no chat template; without one the
  server falls back to Llama 2's ``[INST]`` turns) drops what medlens's Gemma turns keep: a system message (18
  ids in medlens, 14 on the server) and every user message whose content is a list of parts (7 ids on the
  server: ``<bos><start_of_turn>user\\n<start_of_turn>model\\n``, the text is gone). So medlens's OpenAI backend
  sends text-only content as one string, joined as Gemma's template joins parts.
- In-process engine vs transformers: 4 of 5 prompts give the same 32 tokens. "List three symptoms of
  pneumonia." parts at generated token 7 (index 6): transformers' top two logits there are -4.476 (" mendatang")
  and -4.682 (" szpital"), a gap of 0.206; llama.cpp ranks them the other way (-4.081 " szpital", then
  -4.568). Across the 262,144-entry vocabulary the two engines' next-token logits differ by at most 0.82-1.22
  (mean 0.13-0.41) at the prompts' last position, although the weights are the same dequantised values:
  ggml's CPU matmuls quantise the activations to 8 bits (Q8_K blocks) for the Q4_K/Q6_K dot products. The KV
  cache is not the cause (an f32 KV cache leaves the gaps at 1.49 and 1.01). So greedy outputs agree until a
  near-tie; that is what the parity test asserts.
- In-process engine vs the server: the same tokens on all 5 prompts when the request sets
  ``repeat_penalty: 1.0`` (``--model-arg 'extra_body={"repeat_penalty": 1.0}'``). Without it the server applies
  its default ``repeat_penalty`` of 1.1 over the last 64 generated tokens, so "greedy" answers leave the plain
  greedy ones as soon as a generated token repeats (4 of the 5 prompts, each after its first line).
- The server detokenises without special tokens: ``<unused94>``/``<unused95>`` (MedGemma's thinking markers)
  do not reach the client; the in-process engine keeps them, as transformers does. Its ``completion_tokens``
  leave out the end token, which both medlens engines count.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medlens.backends import ENGINES, GenerationRequest, load_backend
from medlens.errors import BackendUnavailableError, MedlensError, ModelNotAvailableError

pytest.register_assert_rewrite("servers")  # the plugin below, imported here first
from servers import LLAMACPP_MISSING, LlamaServer, llamacpp_missing  # noqa: E402

pytest_plugins = ["servers"]

needs_llamacpp = pytest.mark.skipif(llamacpp_missing() is not None, reason=LLAMACPP_MISSING)

PROMPTS = (
    "The capital of France is",
    "Question: Which organ pumps blood around the body?\nAnswer:",
    "List three symptoms of pneumonia.",
    "A chest X-ray shows a small left pleural effusion. What does that mean?",
    "Write a short note about asthma.",
)
#: greedy tokens compared per prompt
N_TOKENS = 32
#: a divergence between engines is accepted only where the reference's top two logits are this close
NEAR_TIE = 0.5
NOTES = "Referred by GP for chest pain.\n\n## 2020-02-01 Cardiology clinic\nExercise test negative.\n"


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def greedy(text: str, max_new_tokens: int = N_TOKENS) -> GenerationRequest:
    return GenerationRequest(user(text), max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """The in-process llamacpp engine with gemma-3-270m."""
    reason = llamacpp_missing()
    if reason:
        pytest.skip(reason)
    backend = load_backend("llamacpp:gemma-3-270m")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference() -> Iterator[Any]:
    """medlens's transformers engine with gemma-3-270m (float32)."""
    pytest.importorskip("torch")
    backend = load_backend("gemma-3-270m", device="cpu", dtype="float32")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def served(llamacpp_server: str) -> Any:
    """medlens's OpenAI backend pointed at the llama.cpp server."""
    return load_backend(f"openai:gemma-3-270m@{llamacpp_server}")


# ---------------------------------------------------------------- without llama-cpp-python


def test_engine_is_registered() -> None:
    assert ENGINES.get("llamacpp") == "medlens.backends.llamacpp_backend:LlamaCppBackend"


def test_missing_llama_cpp_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(BackendUnavailableError, match=r"llama-cpp-python.*make llamacpp.*medlens\[llamacpp\]"):
        load_backend("llamacpp:gemma-3-270m")


# ---------------------------------------------------------------- the server, through the OpenAI backend


def test_server_completions(served: Any, reference: Any) -> None:
    (out,) = served.generate([greedy(PROMPTS[0], max_new_tokens=5)])
    assert out.text.strip() and out.finish_reason == "length" and out.completion_tokens == 5
    assert out.prompt_tokens == len(reference.prepare(user(PROMPTS[0]))["input_ids"][0]) == 14


def test_server_greedy_is_deterministic(served: Any) -> None:
    first, second = served.generate([greedy(PROMPTS[1], 16), greedy(PROMPTS[1], 16)])
    assert first.text and (first.text, first.completion_tokens) == (second.text, second.completion_tokens)


def ask_about_notes(cli: Any, folder: Path, model: str, tokens: int) -> dict[str, Any]:
    """``medlens ask NOTES QUESTION --task ehr-qa`` with ``model``: the envelope (exit code 0 checked)."""
    notes = folder / "notes.md"
    notes.write_text(NOTES)
    args = ("ask", notes, "Was the exercise test negative?", "--task", "ehr-qa", "--model", model)
    code, out, err = cli(*args, "--max-new-tokens", str(tokens), "-q")
    assert code == 0, err
    return json.loads(out)


def test_cli_ask_through_the_server(llamacpp_server: str, tmp_path: Path, cli: Any) -> None:
    result = ask_about_notes(cli, tmp_path, f"openai:gemma-3-270m@{llamacpp_server}", 8)
    assert (result["task"], result["engine"], result["model"], result["n_images"]) == (
        "ehr-qa",
        "openai",
        "gemma-3-270m",
        0,
    )
    assert result["prompt_tokens"] > 0 and 0 < result["completion_tokens"] <= 8
    assert result["finish_reason"] in ("stop", "length") and isinstance(result["answer"], str)
    assert result["disclaimer"] == "Research use only, not for clinical decisions."
    # the task's text-only parts reach the server as one string, so it renders the whole prompt: the same
    # token count as the in-process engine (a list of parts would have been dropped: 7 tokens)
    assert result["prompt_tokens"] == ask_about_notes(cli, tmp_path, "llamacpp:gemma-3-270m", 8)["prompt_tokens"]


def test_server_prompt_rendering(llamacpp_server_process: LlamaServer, engine: Any) -> None:
    """What llama-cpp-python's "gemma" chat format keeps of medlens's messages (token counts from ``usage``)."""

    def served_prompt_tokens(messages: list[dict[str, Any]]) -> int:
        body = {"messages": messages, "max_tokens": 1, "temperature": 0}
        return llamacpp_server_process.post("/chat/completions", body)["usage"]["prompt_tokens"]

    text = user(PROMPTS[0])
    parts = [{"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]}]
    system = [{"role": "system", "content": "Be brief."}, *text]
    assert served_prompt_tokens(text) == len(engine.prompt_ids(text)) == 14
    assert len(engine.prompt_ids(parts)) == 14 and len(engine.prompt_ids(system)) == 18
    # the server drops list content (only <bos><start_of_turn>user\n<start_of_turn>model\n is left) and the system
    # message; MedGemma GGUFs with a chat template are rendered by jinja2 instead, which reads both
    assert served_prompt_tokens(parts) == 7
    assert served_prompt_tokens(system) == 14


# ---------------------------------------------------------------- the in-process engine


@needs_llamacpp
def test_engine_completions_and_usage(engine: Any, reference: Any) -> None:
    assert (engine.engine, engine.model_name, engine.text_only) == ("llamacpp", "gemma-3-270m", True)
    assert engine.default_max_new_tokens == 128 and engine.model_warning == reference.model_warning
    assert engine.fingerprint.startswith("llamacpp-") and engine.fingerprint != reference.fingerprint
    (out,) = engine.generate([greedy(PROMPTS[0], 4)])
    assert (out.prompt_tokens, out.completion_tokens, out.finish_reason) == (14, 4, "length")
    assert out.text.strip() and set(out.timings) == {"preprocess", "prefill", "generate"}


@needs_llamacpp
def test_engine_greedy_is_deterministic(engine: Any) -> None:
    first = engine.generate_one(greedy(PROMPTS[2], 16))
    engine.generate_one(greedy(PROMPTS[3], 4))  # another prompt in between (llama.cpp reuses a cached prefix)
    again = engine.generate([greedy(PROMPTS[2], 16)] * 2)
    assert all((o.text, o.completion_tokens) == (first.text, first.completion_tokens) for o in again)


@needs_llamacpp
def test_engine_sampling_is_seeded(engine: Any) -> None:
    def sample(seed: int) -> str:
        return engine.generate_one(
            GenerationRequest(user(PROMPTS[4]), max_new_tokens=16, temperature=1.0, seed=seed)
        ).text

    # the first request evaluates its whole prompt, later ones too (no prefix cache): the same distribution
    first, again, other = sample(1), sample(1), sample(2)
    assert first == again and first != other


@needs_llamacpp
def test_engine_stops_at_an_end_token(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    newline = engine.prompt_ids(user("x"))[-1]  # the prompt ends with "model\n": 107 is "\n"
    assert newline == 107 and {1, 106} <= engine.stop_ids  # <eos>, <end_of_turn>
    monkeypatch.setattr(engine, "stop_ids", engine.stop_ids | {newline})
    out = engine.generate_one(greedy(PROMPTS[0]))
    # "The capital of France is devenue\n": the end token is counted, not shown
    assert (out.text, out.completion_tokens, out.finish_reason) == ("The capital of France is devenue", 7, "stop")


@needs_llamacpp
def test_engine_keeps_thinking_markers(engine: Any, reference: Any) -> None:
    words = engine.prompt_ids(user("The answer"))[4:-5]  # inside <bos><start_of_turn>user\n ... <end_of_turn>...
    tokens = [100, *words, 101, *words, 106]  # <unused94> ... <unused95> ... <end_of_turn>
    decoded = reference.tokenizer.decode(tokens, skip_special_tokens=False)
    assert decoded == "<unused94>The answer<unused95>The answer<end_of_turn>"
    assert engine.completion_text(tokens) == "<unused94>The answer<unused95>The answer"


@needs_llamacpp
def test_engine_prompts_are_the_transformers_prompts(engine: Any, reference: Any) -> None:
    conversations = [user(p) for p in PROMPTS] + [
        [{"role": "system", "content": "Be brief."}, *user("Hi")],
        [{"role": "user", "content": [{"type": "text", "text": NOTES}, {"type": "text", "text": "Why?"}]}],
    ]
    for messages in conversations:
        assert engine.render(messages) == reference.render(messages)
        assert engine.prompt_ids(messages) == reference.prepare(messages)["input_ids"][0].tolist()


@needs_llamacpp
def test_greedy_parity_with_transformers(engine: Any, reference: Any) -> None:
    """Same prompt ids; the same greedy tokens up to a near-tie (see the module docstring for the numbers)."""
    import torch

    identical = 0
    for prompt in PROMPTS:
        request = greedy(prompt)
        inputs = reference.prepare(request.messages)
        ids = inputs["input_ids"][0].tolist()
        assert engine.prompt_ids(request.messages) == ids
        ours, _, _ = engine.decode(ids, request)
        with torch.inference_mode():
            generated = reference.model.generate(
                **inputs,
                max_new_tokens=N_TOKENS,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
                eos_token_id=sorted(engine.stop_ids),
            )
        theirs = generated.sequences[0, len(ids) :].tolist()
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        if k is None:
            identical += 1
            assert ours == theirs
            continue
        top2 = torch.topk(generated.logits[k][0].float(), 2).values
        gap = float(top2[0] - top2[1])
        assert k > 0 and gap < NEAR_TIE, f"{prompt!r}: token {k} differs where transformers' top-2 gap is {gap:.3f}"
    assert identical >= 4  # measured: 4 of 5 identical over 32 tokens; "List three symptoms ..." parts at token 7


@needs_llamacpp
def test_server_parity_with_the_engine(llamacpp_server_process: LlamaServer, served: Any, engine: Any) -> None:
    """The server's greedy answers are the engine's without its default repeat penalty."""
    from medlens.backends import load_backend

    plain_greedy = load_backend(
        f"openai:gemma-3-270m@{llamacpp_server_process.url}", extra_body={"repeat_penalty": 1.0}
    )
    differs = 0
    for prompt in PROMPTS:
        ours = engine.generate_one(greedy(prompt))
        body = {"messages": user(prompt), "max_tokens": N_TOKENS, "temperature": 0, "repeat_penalty": 1.0}
        raw = llamacpp_server_process.post("/chat/completions", body)
        plain = raw["choices"][0]["message"]["content"]
        assert (plain.rstrip(), raw["usage"]["completion_tokens"]) == (ours.text, ours.completion_tokens)
        assert plain_greedy.generate_one(greedy(prompt)).text == ours.text  # extra_body reaches the server
        penalised = served.generate_one(greedy(prompt))  # repeat_penalty 1.1, the server's default
        assert penalised.prompt_tokens == ours.prompt_tokens
        assert penalised.text.split("\n")[0] == ours.text.split("\n")[0]
        differs += penalised.text != ours.text
    assert differs >= 1  # measured: 4 of 5 leave plain greedy after their first line


@needs_llamacpp
def test_cli_ask_in_process(tmp_path: Path, cli: Any, engine: Any) -> None:
    result = ask_about_notes(cli, tmp_path, "llamacpp:gemma-3-270m", 6)
    assert (result["engine"], result["model"], result["completion_tokens"], result["finish_reason"]) == (
        "llamacpp",
        "gemma-3-270m",
        6,
        "length",
    )
    assert result["prompt_tokens"] > 50  # the notes and the question, as a list of parts, reach the model
    assert any("small base" in w for w in result["warnings"])


@needs_llamacpp
def test_images_and_other_models_are_refused(engine: Any, tmp_path: Path) -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    with pytest.raises(MedlensError, match=r"reads text only \(1 images.*--model-arg mmproj=PATH"):
        engine.generate([GenerationRequest([{"role": "user", "content": content}])])
    with pytest.raises(ModelNotAvailableError, match="mmproj: no such file"):
        load_backend("llamacpp:gemma-3-270m", mmproj=str(tmp_path / "mmproj.gguf"))
    with pytest.raises(ModelNotAvailableError, match="loads GGUF files"):
        load_backend("llamacpp:test-tiny")
    with pytest.raises(MedlensError, match="takes no option 'device'"):
        load_backend("llamacpp:gemma-3-270m", device="cpu")


@needs_llamacpp
def test_gguf_path_and_a_small_context(engine: Any) -> None:
    small = load_backend(f"llamacpp:{engine.model_path}", n_ctx=20, n_threads=1, prefix_cache=True)
    try:
        (out,) = small.generate([greedy(PROMPTS[0], 16)])  # 14 prompt tokens: room for 6
        assert (out.prompt_tokens, out.completion_tokens, out.finish_reason) == (14, 6, "length")
        assert out.text == engine.generate_one(greedy(PROMPTS[0], 6)).text
        with pytest.raises(MedlensError, match=r"more than the context of 20: pass --model-arg n_ctx="):
            small.generate_one(greedy(PROMPTS[3]))
    finally:
        small.close()


# ---------------------------------------------------------------- a GGUF with a chat template (as MedGemma's)


@pytest.fixture(scope="module")
def templated_engine(templated_gguf: Path) -> Iterator[Any]:
    reason = llamacpp_missing()
    if reason:
        pytest.skip(reason)
    backend = load_backend(f"llamacpp:{templated_gguf}", n_ctx=2048)
    yield backend
    backend.close()


CONVERSATIONS = (
    user(PROMPTS[0]),
    [{"role": "user", "content": [{"type": "text", "text": NOTES}, {"type": "text", "text": "Why?"}]}],
    [
        {"role": "system", "content": "Be brief."},
        *user("Hi"),
        {"role": "assistant", "content": "Hello."},
        *user("Why?"),
    ],
)


@needs_llamacpp
def test_chat_template_renders_the_gemma_turns(templated_engine: Any, engine: Any) -> None:
    """A file's chat template is what the engine renders with (jinja2, as the server does)."""
    assert templated_engine._template is not None and engine._template is None
    for messages in CONVERSATIONS:
        assert templated_engine.render(messages) == engine.render(messages)
        assert templated_engine.prompt_ids(messages) == engine.prompt_ids(messages)


@needs_llamacpp
def test_server_with_a_chat_template(
    templated_server: LlamaServer, templated_engine: Any, tmp_path: Path, cli: Any
) -> None:
    """With a chat template the server reads list content and system messages too: the engine's prompts and
    tokens, and the same ``medlens ask`` prompt as in process."""
    for messages in CONVERSATIONS:
        request = GenerationRequest(messages, max_new_tokens=12)
        ours = templated_engine.generate_one(request)
        body = {"messages": messages, "max_tokens": 12, "temperature": 0, "repeat_penalty": 1.0}
        raw = templated_server.post("/chat/completions", body)
        assert raw["usage"]["prompt_tokens"] == ours.prompt_tokens == len(templated_engine.prompt_ids(messages))
        assert raw["choices"][0]["message"]["content"].rstrip() == ours.text
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES)
    prompt_tokens = []
    for model in (f"openai:gemma-3-270m@{templated_server.url}", f"llamacpp:{templated_engine.model_path}"):
        code, out, err = cli(
            "ask",
            notes,
            "Was the exercise test negative?",
            "--task",
            "ehr-qa",
            "--model",
            model,
            "--max-new-tokens",
            "4",
            "-q",
        )
        assert code == 0, err
        prompt_tokens.append(json.loads(out)["prompt_tokens"])
    assert prompt_tokens[0] == prompt_tokens[1] > 50
