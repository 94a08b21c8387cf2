"""Small synthetic datasets in the layout of every built-in benchmark (test-only; no patient data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from medlens.demo.phantom import ct_phantom, write_ct_series


def write_png(path: Path, seed: int, size: int = 48) -> str:
    """A random grey PNG of ``size`` x ``size`` pixels; returns its file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size)).astype(np.uint8)).save(path)
    return path.name


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_benchmark(folder: Path, name: str, kind: str, metrics: list[dict], **keys: Any) -> Path:
    """A benchmark YAML file ``folder/NAME.yaml`` reading ``NAME/test.jsonl`` under the data root; ``keys``
    are further top-level keys (prompt, options, generation ...)."""
    spec = {
        "name": name,
        "description": f"test benchmark {name}",
        "kind": kind,
        "data": {"path": f"{name}/test.jsonl"},
        "metrics": metrics,
        **keys,
    }
    path = folder / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _mcq(n: int = 3) -> list[dict]:
    return [
        {
            "id": f"q{i}",
            "question": f"Which organ makes insulin? ({i})",
            "options": {"A": "liver", "B": "pancreas", "C": "spleen", "D": "kidney"},
            "target": "B",
        }
        for i in range(n)
    ]


def build_all(root: Path) -> Path:
    """Write a dataset for every built-in benchmark that reads files; returns the data root."""
    for name in (
        "medqa/test.jsonl",
        "medmcqa/validation.jsonl",
        "mmlu-medical/test.jsonl",
        "medxpertqa/test.jsonl",
        "afrimedqa/test.jsonl",
    ):
        write_jsonl(root / name, _mcq())
    write_jsonl(
        root / "pubmedqa/test.jsonl",
        [
            {
                "id": f"p{i}",
                "context": "Aspirin reduced events in the trial.",
                "question": "Does aspirin help?",
                "target": t,
            }
            for i, t in enumerate(["yes", "no", "maybe"])
        ],
    )
    for bench in ("vqa-rad", "slake"):
        write_jsonl(
            root / f"{bench}/test.jsonl",
            [
                {"id": f"v{i}", "image": write_png(root / bench / f"img{i}.png", i), "question": q, "target": a}
                for i, (q, a) in enumerate([("Is there a fracture?", "no"), ("Which organ is shown?", "left lung")])
            ],
        )
    write_jsonl(
        root / "pathmcqa/test.jsonl",
        [{**q, "image": write_png(root / "pathmcqa" / f"p{i}.png", 10 + i)} for i, q in enumerate(_mcq(2))],
    )
    for _bench, folder in (
        ("mimic-cxr-conditions", "mimic-cxr"),
        ("chexpert-conditions", "chexpert"),
        ("cxr14-conditions", "cxr14"),
    ):
        rows = []
        for i in range(2):
            image = write_png(root / folder / f"cxr{i}.png", 20 + i)
            rows += [
                {"id": f"{i}-{c}", "image": image, "label": c, "target": t}
                for c, t in (("cardiomegaly", "yes"), ("pleural effusion", "no"))
            ]
        write_jsonl(root / folder / "conditions.jsonl", rows)
    for folder in ("ct-rate", "ct"):
        rows = []
        for i in range(2):
            hu, _ = ct_phantom(n_slices=6, size=32, seed=i)
            write_ct_series(hu, root / folder / f"vol{i}", seed=i)
            rows += [
                {"id": f"{i}-{c}", "image": f"vol{i}", "label": c, "target": t}
                for c, t in (("liver lesion", "yes"), ("pleural effusion", "no"), ("emphysema", "no"))
            ]
        write_jsonl(root / folder / "conditions.jsonl", rows)
    import nibabel as nib

    (root / "mri").mkdir(parents=True, exist_ok=True)
    mr = np.random.default_rng(3).random((24, 24, 6)).astype(np.float32) * 500
    nib.save(nib.Nifti1Image(mr, np.eye(4)), str(root / "mri" / "brain.nii.gz"))
    write_jsonl(
        root / "mri/conditions.jsonl",
        [{"id": c, "image": "brain.nii.gz", "label": c, "target": t} for c, t in (("tumor", "no"), ("edema", "yes"))],
    )
    write_jsonl(
        root / "chest-imagenome/test.jsonl",
        [
            {
                "id": "g0",
                "image": write_png(root / "chest-imagenome" / "a.png", 30),
                "question": "Locate the heart.",
                "target": [{"label": "heart", "box_2d": [400, 300, 800, 700]}],
            }
        ],
    )
    write_jsonl(
        root / "ms-cxr-t/test.jsonl",
        [
            {
                "id": "t0",
                "prior": write_png(root / "ms-cxr-t" / "p.png", 40),
                "current": write_png(root / "ms-cxr-t" / "c.png", 41),
                "question": "Has the pleural effusion changed?",
                "group": "pleural effusion",
                "target": "improved",
            }
        ],
    )
    write_jsonl(
        root / "lab-reports/test.jsonl",
        [
            {
                "id": "l0",
                "image": write_png(root / "lab-reports" / "page.png", 50, 64),
                "target": [{"name": "Hemoglobin", "result": "13.5", "unit": "g/dL"}],
            }
        ],
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "p", "gender": "female", "birthDate": "1950-01-01"}},
            {
                "resource": {
                    "resourceType": "Condition",
                    "id": "c",
                    "subject": {"reference": "Patient/p"},
                    "code": {"text": "Type 2 diabetes"},
                    "onsetDateTime": "2015-01-01",
                }
            },
        ],
    }
    (root / "ehrqa").mkdir(parents=True, exist_ok=True)
    (root / "ehrqa" / "record.json").write_text(json.dumps(bundle))
    write_jsonl(
        root / "ehrqa/test.jsonl",
        [
            {
                "id": "e0",
                "record": "record.json",
                "question": "Does the patient have diabetes? Final Answer: yes or no.",
                "target": "yes",
            }
        ],
    )
    write_jsonl(
        root / "wsi/test.jsonl",
        [
            {
                "id": "w0",
                "images": [write_png(root / "wsi" / f"patch{i}.png", 60 + i) for i in range(3)],
                "tissue": "breast",
                "procedure": "core needle biopsy",
                "target": "invasive ductal carcinoma, grade 2",
            }
        ],
    )
    write_jsonl(
        root / "medpix/test.jsonl",
        [
            {
                "id": "m0",
                "image": write_png(root / "medpix" / "case.png", 70),
                "question": "A 40-year-old with headache.",
                "target": "meningioma",
                "synonyms": ["meningeal tumour"],
            }
        ],
    )
    return root
