"""Keeping patient data out of what medseg writes.

By default medseg never puts a patient's name, ID, birth date or accession number into
output file names, logs, error messages or batch manifests: DICOM outputs are named by
hashes of study and series UIDs, and batch manifests record a hash of each input's path
(hospital folder names often hold patient names) unless ``--record-paths`` is given.

DICOM SEG objects must name their patient to be filed next to the images in a PACS, so
they copy the source's patient and study attributes. With ``--anonymize`` they are
de-identified instead (:func:`anonymize_dataset`): identifying attributes are replaced by
pseudonyms or emptied, PatientIdentityRemoved is YES and DeidentificationMethod(CodeSequence)
says what was done. Pseudonyms are an HMAC-SHA256 of the original value, keyed by
``MEDSEG_ANON_KEY`` when it is set (the same patient gets the same pseudonym on every run
and machine sharing the key) or else by a random key drawn once per process (consistent
within one run, not linkable across runs). A plain hash is not used: patient IDs are short
enough to be recovered from one by trying them all. UIDs (study, series, frame of
reference, referenced instances) are kept, because the SEG must point at its source images
to be placed on them (DICOM PS3.15 "Retain UIDs" option).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

#: Attributes replaced by a keyed pseudonym (kept consistent for one patient/study).
PSEUDONYMISED = ("PatientName", "PatientID", "AccessionNumber", "StudyID")
#: Attributes emptied (type 2 in the SEG: present, zero length) or removed (type 3).
EMPTIED = ("PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
           "StudyDate", "StudyTime", "ReferringPhysicianName", "PhysiciansOfRecord", "PerformingPhysicianName",
           "OperatorsName", "NameOfPhysiciansReadingStudy", "RequestingPhysician")
REMOVED = ("OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress",
           "PatientTelephoneNumbers", "PatientMotherBirthName", "MilitaryRank", "EthnicGroup", "PatientComments",
           "AdditionalPatientHistory", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
           "StationName", "IssuerOfPatientID", "MedicalRecordLocator", "RequestAttributesSequence",
           "ReferencedPatientSequence", "PatientInsurancePlanCodeSequence", "StudyDescription", "ResponsiblePerson",
           "ResponsibleOrganization", "CountryOfResidence", "RegionOfResidence", "PatientReligiousPreference")
#: What a DICOM SEG must keep to lie on its source images.
KEPT = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "ReferencedSeriesSequence",
        "SourceImageSequence", "ReferencedSOPInstanceUID")

METHOD = "medseg --anonymize: keyed pseudonyms, PHI removed, UIDs kept"
_PROCESS_KEY = secrets.token_bytes(32)


def _key() -> bytes:
    key = os.environ.get("MEDSEG_ANON_KEY")
    return key.encode() if key else _PROCESS_KEY


def pseudonym(value: str, prefix: str = "ANON", n: int = 12) -> str:
    """A stable stand-in for ``value`` (keyed HMAC, see the module documentation)."""
    digest = hmac.new(_key(), str(value).encode(), hashlib.sha256).hexdigest()[:n].upper()
    return f"{prefix}{digest}"


def anonymize_dataset(ds: Any) -> Any:
    """De-identify a pydicom dataset in place (and return it): pseudonyms, emptied and removed
    attributes as listed above, PatientIdentityRemoved YES, DeidentificationMethod set."""
    from pydicom.dataset import Dataset

    _deidentify(ds)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD[:64]
    codes = []
    for value, meaning in (("113100", "Basic Application Confidentiality Profile"), ("113110", "Retain UIDs Option")):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    return ds


SOURCE_DEIDENTIFIED = "source de-identified; method not recorded in the source"


def complete_deidentification_record(ds: Any) -> Any:
    """An output that copies ``PatientIdentityRemoved YES`` from a source whose export left the method out (a type 1C
    gap ``dciodvfy`` reports) says so in ``DeidentificationMethod``; the patient data itself is not touched."""
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not ds.get("DeidentificationMethod") \
            and "DeidentificationMethodCodeSequence" not in ds:
        ds.DeidentificationMethod = SOURCE_DEIDENTIFIED
    return ds


def _deidentify(ds) -> None:
    """Apply the attribute rules to ``ds`` and every dataset nested in its sequences (highdicom
    copies, for example, the source's institution into ContributingEquipmentSequence)."""
    for keyword in PSEUDONYMISED:
        if keyword in ds:
            original = str(ds.get(keyword) or "")
            if not original:
                continue
            stand_in = pseudonym(original, "ANON^" if keyword == "PatientName" else "ANON")
            setattr(ds, keyword, stand_in[:16] if keyword in ("StudyID", "AccessionNumber") else stand_in)
    for keyword in EMPTIED:
        if keyword in ds:
            setattr(ds, keyword, "")
    for keyword in REMOVED:
        if keyword in ds:
            delattr(ds, keyword)
    for element in list(ds):
        if element.VR == "SQ" and element.value is not None:
            for item in element.value:
                _deidentify(item)


def path_token(relative: str | Path) -> str:
    """What a manifest records for an input path without ``--record-paths``: a SHA-256 prefix.

    ``printf '%s' 'study/series' | sha256sum`` finds the token of a known folder again.
    """
    return "sha256:" + hashlib.sha256(Path(relative).as_posix().encode()).hexdigest()[:16]


def redact(text: str, replacements: dict[str, str]) -> str:
    """Replace each key of ``replacements`` (longest first) in ``text`` by its value."""
    for needle in sorted((k for k in replacements if k and k not in (".", "/")), key=len, reverse=True):
        text = text.replace(needle, replacements[needle])
    return text
