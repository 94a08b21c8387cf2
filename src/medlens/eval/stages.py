"""A benchmark's items as :mod:`medlens.pipeline` stages, for ``medlens eval --ray``.

One unit is one study: the consecutive items the run still lacks that ask about the same input files (a text
item is a unit of its own). ``prepare`` (on a CPU worker) builds the units' queries with the benchmark's kind,
rebuilt once per worker process from the benchmark file, and de-identifies them for a remote backend;
``requests`` are the queries' prompts, so a study's questions reach the engine together and share its
prefix as in a local run; ``finish`` makes the journal records a local run writes (:func:`journal_record`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from medlens.backends import Backend, GenerationOutput, GenerationRequest
from medlens.errors import MedlensError
from medlens.eval.kinds import Item, Kind, Query
from medlens.eval.registry import get_benchmark, make_kind
from medlens.eval.spec import BenchmarkSpec, Generation, load_spec
from medlens.pipeline import Unit
from medlens.warnings_capture import capture_warnings


@dataclass(frozen=True)
class EvalStages:
    """The stages of one run: names and settings only (pickled to the Ray workers)."""

    #: what the user named (a built-in benchmark or a YAML path) and the file it resolved to on the driver
    benchmark: str
    spec_path: str
    #: digest of the whole benchmark spec: a worker that reads another version of the file refuses to run
    spec_digest: str
    recipe: str
    #: the resolved generation settings (token cap, temperature, seed) every request carries
    generation: dict[str, Any]
    #: scrub names and identifiers from the texts (the backend is remote)
    deidentify: bool = False

    def prepare(self, unit: Unit) -> PreparedItems:
        kind = kind_for(self.benchmark, self.spec_path, self.spec_digest, self.recipe)
        with capture_warnings() as caught:
            queries = [kind.query(item) for item in unit.row["items"]]
            if self.deidentify:
                deidentify(queries)
        return PreparedItems(queries, caught)

    def requests(self, unit: Unit, prepared: PreparedItems) -> list[GenerationRequest]:
        generation = Generation.model_validate(self.generation)
        return [request_for(query, generation) for query in prepared.queries]

    def finish(
        self, unit: Unit, prepared: PreparedItems, outputs: list[GenerationOutput], backend: Backend | None
    ) -> dict[str, Any]:
        records = [
            journal_record(key, item, query, output)
            for key, item, query, output in zip(
                unit.row["keys"], unit.row["items"], prepared.queries, outputs, strict=True
            )
        ]
        revision = backend.revision if backend is not None else None
        return {"records": records, "revision": revision, "warnings": prepared.warnings}


@dataclass
class PreparedItems:
    """A unit's queries (their images travel to the model once) and the warnings preparing them raised."""

    queries: list[Query]
    warnings: list[str] = field(default_factory=list)


def spec_digest(spec: BenchmarkSpec) -> str:
    """A digest of everything a benchmark file says (prompt, kind, options, generation, data, metrics)."""
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


@lru_cache(maxsize=4)
def kind_for(benchmark: str, spec_path: str, digest: str, recipe: str) -> Kind:
    """The benchmark's kind in this process (built once per worker): from the driver's file when this machine
    sees it, else by name; a benchmark that reads differently here is refused (its outputs would be keyed by
    another prompt)."""
    path = Path(spec_path)
    spec, path = (load_spec(path), path) if path.is_file() else get_benchmark(benchmark)
    if spec_digest(spec) != digest:
        raise MedlensError(
            f"benchmark {spec.name} reads differently on this worker than on the driver: give every node the same "
            "medlens version and benchmark file",
            str(path),
        )
    return make_kind(spec, path, recipe)


def request_for(query: Query, generation: Generation) -> GenerationRequest:
    """The request of one query with the run's generation settings."""
    return GenerationRequest(
        query.messages,
        max_new_tokens=generation.max_new_tokens,
        temperature=generation.temperature,
        seed=generation.seed,
    )


def deidentify(queries: list[Query]) -> None:
    """Scrub the queries' texts for a remote backend, with the names and identifiers found in their files."""
    from medlens.io.text_deid import phi_terms, scrub_messages

    if sum(scrub_messages(q.messages, phi_terms(q.files)) for q in queries):
        warnings.warn("the text was de-identified before it was sent to a remote backend", stacklevel=2)


def journal_record(key: str, item: Item, query: Query, output: GenerationOutput) -> dict[str, Any]:
    """One output's journal line, with what scoring needs later: the prompt text and the parser's context."""
    return {
        "key": key,
        "id": item["id"],
        "raw_output": output.text,
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "finish_reason": output.finish_reason,
        "prompt": prompt_text(query),
        "context": json.loads(json.dumps(query.context, default=str)),
    }


def prompt_text(query: Query) -> str:
    """The query's messages as text, ``<image>`` where an image goes."""
    parts = []
    for message in query.messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
            parts.append("<image>" if part.get("type") == "image" else str(part.get("text", "")))
    return "\n".join(parts)
