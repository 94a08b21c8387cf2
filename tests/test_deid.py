"""``medlens deid``: a PHI canary corpus (every Annex E attribute pydicom can set, private tags, PHI in file
names) comes out with zero canary hits, consistent UIDs, the same prepared pixels, and each action code
(D/Z/X/K/C/U) doing what PS3.15 says."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from dicom_factory import write_radiograph, write_series  # noqa: E402
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import CTImageStorage  # noqa: E402

from medlens.errors import InputError, OutputFolderError  # noqa: E402
from medlens.io.deid import ACTION_HANDLERS, Deidentifier, DeidOptions, deidentify  # noqa: E402
from medlens.io.deid_profile import ACTIONS, BASIC_PROFILE, profile_tags, resolve  # noqa: E402

UID_SEQUENCES = {"ReferencedImageSequence", "SourceImageSequence"}
N_SLICES = 4


class Canaries:
    """Unique strings for every attribute, remembered so the output bytes can be searched for them."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def new(self, kind: str, vr: str) -> str:
        n = len(self.values)
        day = dt.date(1850, 1, 1) + dt.timedelta(days=n)
        value = {
            "DA": f"{day:%Y%m%d}",
            "TM": f"{n % 24:02d}{n % 60:02d}11.{500000 + n:06d}",
            "DT": f"{day:%Y%m%d}{n % 24:02d}1111.{500000 + n:06d}",
            "UI": f"1.2.826.0.1.3680043.10.999.{10000 + n}",
            "DS": f"{100 + n}.77345",
            "IS": f"7734{1000 + n}",
        }.get(vr, f"CNRY{1000 + n}X")
        self.values[f"{kind}#{n}"] = value
        return value

    def hits(self, blob: bytes) -> list[str]:
        return [k for k, v in self.values.items() if v.encode() in blob]


def _code_item(canaries: Canaries, kind: str) -> Dataset:
    item = Dataset()
    item.CodeValue = canaries.new(kind, "SH")
    item.CodingSchemeDesignator = "99CNRY"
    item.CodeMeaning = canaries.new(kind, "LO")
    item.PersonName = canaries.new(kind, "PN")
    return item


#: set by the corpus fixture itself (a patient, dates for the shift checks)
FIXED = {"PatientName", "PatientID", "StudyDate", "SeriesDate", "ContentDate", "AcquisitionDateTime", "StudyTime"}


def fill_canaries(ds: Dataset, canaries: Canaries, referenced: str) -> None:
    """Every string-valued Annex E attribute set to a canary; sequences get an item of canaries; the UID
    sequences reference ``referenced``; private tags (also inside a sequence) hold canaries too."""
    keep = {"SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
            "MediaStorageSOPInstanceUID"}  # fmt: skip
    for keyword in BASIC_PROFILE:
        tag = tag_for_keyword(keyword)
        if (
            tag is None or keyword in keep | FIXED or tag >> 16 in (0, 2)
        ):  # command / file meta groups: not in a dataset
            continue
        vr = dictionary_VR(tag)
        if keyword in UID_SEQUENCES:
            item = Dataset()
            item.ReferencedSOPClassUID = CTImageStorage
            item.ReferencedSOPInstanceUID = referenced
            setattr(ds, keyword, [item])
        elif vr == "SQ":
            setattr(ds, keyword, [_code_item(canaries, keyword)])
        elif vr in ("LO", "SH", "PN", "LT", "ST", "UT", "UC", "CS", "AE", "DA", "TM", "DT", "UI", "DS", "IS"):
            setattr(ds, keyword, canaries.new(keyword, vr))
    block = ds.private_block(0x0009, "CANARY CORP", create=True)
    block.add_new(0x01, "LO", canaries.new("private", "LO"))
    block.add_new(0x02, "UI", canaries.new("private", "UI"))
    inner = Dataset()
    inner.private_block(0x0011, "CANARY INNER", create=True).add_new(0x10, "LO", canaries.new("private", "LO"))
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = [inner]
    ds.BurnedInAnnotation = "NO"


def ramp(i: int) -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64]
    return ((xx * 7 + yy * 3 + i * 11) % 400).astype(np.int16)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Canaries, list[Path]]:
    """A 4-slice CT in a folder whose names carry PHI, every slice full of canaries; slice i+1 references
    slice i (ReferencedImageSequence / SourceImageSequence)."""
    import pydicom

    src = tmp_path / "CNRYDIR_Smith_John"
    canaries = Canaries()
    paths = write_series(
        src / "CNRYSERIES", [ramp(i) for i in range(N_SLICES)], filenames=[f"CNRYFILE{i}.dcm" for i in range(N_SLICES)]
    )
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        fill_canaries(ds, canaries, uids[i - 1])
        ds.PatientName = "CNRYPATIENT^Smith"
        ds.PatientID = "CNRYMRN1234567"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
        ds.AcquisitionDateTime = "20240101101010"
        ds.StudyTime = "101112"
        ds.save_as(path, enforce_file_format=True)
    canaries.values["patient"] = "CNRYPATIENT"
    canaries.values["mrn"] = "CNRYMRN1234567"
    canaries.values["source-uid"] = uids[0]
    return src, canaries, paths


def _outputs(out: Path) -> list[Dataset]:
    import pydicom

    return sorted((pydicom.dcmread(p) for p in out.rglob("*.dcm")), key=lambda d: int(d.InstanceNumber))


def test_canary_corpus_leaves_nothing(corpus, tmp_path: Path, cli) -> None:
    src, canaries, paths = corpus
    blob_in = b"".join(p.read_bytes() for p in paths)
    missing = set(canaries.values) - set(canaries.hits(blob_in))
    assert not missing  # the corpus really holds every canary
    out = tmp_path / "out"
    code, stdout, err = cli("deid", src, out, "--quiet")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["files"] == N_SLICES
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == N_SLICES
    assert not [p for p in out.rglob("*") if "CNRY" in str(p.relative_to(out)) or "Smith" in str(p)]
    assert sorted(p.parent.relative_to(out).parts.__len__() for p in files) == [1] * N_SLICES  # tree mirrored
    blob_out = b"".join(p.read_bytes() for p in files)
    assert canaries.hits(blob_out) == []
    for ds in _outputs(out):
        assert not [e for e in ds.iterall() if e.tag.is_private]
        assert ds.PatientIdentityRemoved == "YES"
        codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence]
        assert ("113100", "DCM") in codes
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_uids_consistent_and_references_valid(corpus, tmp_path: Path) -> None:
    src, _, _ = corpus
    deidentify(src, tmp_path / "a")
    out = _outputs(tmp_path / "a")
    assert len({d.StudyInstanceUID for d in out}) == 1
    assert len({d.SeriesInstanceUID for d in out}) == 1
    assert len({d.FrameOfReferenceUID for d in out}) == 1
    assert len({d.SOPInstanceUID for d in out}) == N_SLICES
    for i, ds in enumerate(out):
        assert ds.SOPInstanceUID.startswith("2.25.") and ds.SOPClassUID == CTImageStorage  # well-known kept
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        ref = ds.ReferencedImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == out[i - 1].SOPInstanceUID  # the reference follows its target
        assert ref.ReferencedSOPClassUID == CTImageStorage
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == out[i - 1].SOPInstanceUID


def test_salt_file_makes_runs_agree(corpus, tmp_path: Path, cli) -> None:
    src, _, _ = corpus
    salt = tmp_path / "keys" / "salt"
    for name in ("a", "b"):
        assert cli("deid", src, tmp_path / name, "--salt-file", salt, "-q")[0] == 0
    assert salt.exists() and (salt.stat().st_mode & 0o077) == 0
    deidentify(src, tmp_path / "c")  # a random key
    a, b, c = (_outputs(tmp_path / n) for n in "abc")
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == sorted(p.name for p in (tmp_path / "b").rglob("*"))
    assert not {d.SOPInstanceUID for d in a} & {d.SOPInstanceUID for d in c}


def test_same_prepared_pixels(corpus, tmp_path: Path) -> None:
    from medlens.prep import prepare_study

    src, _, _ = corpus
    deidentify(src, tmp_path / "out")
    before, after = prepare_study(src), prepare_study(tmp_path / "out")
    assert len(before.images) == len(after.images) > 0
    for x, y in zip(before.images, after.images, strict=True):
        np.testing.assert_array_equal(x, y)
    assert after.series_uid != before.series_uid


# ---------------------------------------------------------------- each action code


def _one(ds: Dataset, options: DeidOptions | None = None) -> Dataset:
    Deidentifier(options).dataset(ds)
    return ds


def _sample() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN42"
    ds.StudyDescription = "CT chest for Jane Doe"
    ds.VerifyingObserverName = "Who^Ever"
    ds.ClinicalTrialSubjectID = "SUBJ-7"
    ds.PersonIdentificationCodeSequence = [Dataset()]
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.AcquisitionDateTime = "20240316080000"
    ds.ContentDate = "20240315"
    ds.Manufacturer = "ACME"
    return ds


def test_action_x_removes() -> None:
    ds = _one(_sample())
    assert "StudyDescription" not in ds
    assert resolve(BASIC_PROFILE["StudyDescription"]) == "X"


def test_action_z_empties() -> None:
    ds = _one(_sample())
    assert "PatientName" in ds and not ds.PatientName and "PatientID" in ds and not ds.PatientID
    assert "StudyDate" in ds and not ds.StudyDate  # Z, dates removed


def test_action_d_dummies() -> None:
    deid = Deidentifier()
    first, second = _sample(), _sample()
    deid.dataset(first)
    deid.dataset(second)
    assert first.VerifyingObserverName == "ANONYMOUS"
    assert first.ClinicalTrialSubjectID.startswith("ANON") and "SUBJ" not in first.ClinicalTrialSubjectID
    assert first.ClinicalTrialSubjectID == second.ClinicalTrialSubjectID  # the pseudonym links the same subject
    assert len(first.PersonIdentificationCodeSequence) == 0
    assert first.ContentDate == "19000101"  # Z/D -> D: a dummy date, type 1 where an IOD needs one


def test_action_u_replaces_uids() -> None:
    deid = Deidentifier()
    ds = _sample()
    deid.dataset(ds)
    assert ds.SOPInstanceUID == deid.uid("1.2.3.4.5") != "1.2.3.4.5"
    assert ds.SOPClassUID == CTImageStorage


def test_action_k_keeps_dates() -> None:
    ds = _one(_sample(), DeidOptions(dates="keep"))
    assert (ds.StudyDate, ds.StudyTime, ds.AcquisitionDateTime) == ("20240315", "101500", "20240316080000")
    assert ds.Manufacturer == "ACME"  # not in the table: kept
    assert ds.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert "113106" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]


def test_action_c_shifts_dates_per_patient() -> None:
    options = DeidOptions(dates="shift", shift_days=30, salt=b"0123456789abcdef0123")
    deid = Deidentifier(options)
    a, b = _sample(), _sample()
    other = _sample()
    other.PatientID = "MRN43"
    for ds in (a, b, other):
        deid.dataset(ds)
    day = dt.datetime.strptime(a.StudyDate, "%Y%m%d").date()
    shift = (dt.date(2024, 3, 15) - day).days
    assert 1 <= shift <= 30
    assert b.StudyDate == a.StudyDate and a.StudyTime == "101500"  # same patient, same offset; times kept
    assert a.AcquisitionDateTime == f"{dt.date(2024, 3, 16) - dt.timedelta(days=shift):%Y%m%d}080000"
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"
    offsets = {Deidentifier(options).date_offset(f"P{i}\0") for i in range(20)}
    assert len(offsets) > 1  # offsets differ between patients


def test_every_code_has_a_handler_and_the_table_is_known() -> None:
    assert set(ACTION_HANDLERS) == set(ACTIONS)
    assert {resolve(c) for c in BASIC_PROFILE.values()} <= set(ACTIONS)
    unknown = [k for k in BASIC_PROFILE if tag_for_keyword(k) is None]
    assert unknown == []
    assert all(keyword_for_tag(t) in BASIC_PROFILE for t in profile_tags())


# ---------------------------------------------------------------- burned-in text, bad input


def test_burned_in_refused_unless_allowed(tmp_path: Path, cli) -> None:
    us = write_radiograph(tmp_path / "in" / "us.dcm", ramp(0).astype(np.uint16), modality="US", bits_stored=None)
    out = tmp_path / "out"
    code, _, err = cli("deid", tmp_path / "in", out)
    assert code == 2 and "us.dcm" in err and "burned-in" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    code, _, err = cli("deid", tmp_path / "in", out, "--allow-burned-in", "-q")
    assert code == 0, err
    (ds,) = _outputs(out)
    assert ds.PatientIdentityRemoved == "NO"
    assert us.exists()


def test_burned_in_yes_refused(tmp_path: Path) -> None:
    write_radiograph(tmp_path / "in" / "cr.dcm", ramp(0).astype(np.uint16), extra={"BurnedInAnnotation": "YES"})
    with pytest.raises(InputError, match="BurnedInAnnotation is YES"):
        deidentify(tmp_path / "in", tmp_path / "out")


def test_bad_inputs(tmp_path: Path, cli) -> None:
    (tmp_path / "notdicom.txt").write_text("hello")
    code, _, err = cli("deid", tmp_path / "notdicom.txt", tmp_path / "o1")
    assert code == 2 and "notdicom.txt" in err and "not a DICOM file" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    write_radiograph(tmp_path / "cr.dcm", ramp(0).astype(np.uint16))
    with pytest.raises(OutputFolderError):
        deidentify(tmp_path / "cr.dcm", taken)
    code, _, err = cli("deid", tmp_path / "cr.dcm", tmp_path / "o2", "--keep-dates", "--shift-dates", "3")
    assert code == 2 and "exclude" in err
