"""PACS over DICOMweb: pull a series (WADO-RS), segment it, store a DICOM SEG back (STOW-RS).

Credentials come from the environment (``MEDSEG_DICOMWEB_USER``,
``MEDSEG_DICOMWEB_PASSWORD``) or from a file (``--credentials FILE``: JSON
``{"username": ..., "password": ...}``), never from the command line, and they are never
printed or logged. URLs with embedded credentials are refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from medseg.core.errors import ConfigError, InputNotFoundError, MedsegError, MissingDependencyError

ENV_USER, ENV_PASSWORD = "MEDSEG_DICOMWEB_USER", "MEDSEG_DICOMWEB_PASSWORD"


class PacsError(MedsegError):
    """The DICOMweb server could not be reached, refused us, or lacks what was asked for."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never show the password
        return f"Credentials(username={self.username!r}, password=***)"


def load_credentials(path: str | Path | None = None) -> Credentials | None:
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputNotFoundError("credentials file not found", path=path,
                                     expected='a JSON file {"username": ..., "password": ...}', fix="check the path")
        try:
            data = json.loads(path.read_text())
            return Credentials(str(data["username"]), str(data["password"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError("credentials file is not valid", path=path,
                              expected='JSON {"username": ..., "password": ...}', found="something else",
                              fix="write the file in that form (and make it readable by you only)") from None
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if user and password is not None:
        return Credentials(user, password)
    return None


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("bad DICOMweb URL", expected="http(s)://host[:port]/dicom-web", found=repr(url),
                          fix="give the server's DICOMweb root URL")
    if parts.username or parts.password:
        raise ConfigError("credentials in the URL are not accepted", found="user:password@ in the URL",
                          fix=f"remove them and set {ENV_USER}/{ENV_PASSWORD} or use --credentials FILE")
    return url.rstrip("/")


def import_dicomweb():
    """``(requests, DICOMwebClient)``, or a one-line error naming the extra to install."""
    try:
        import requests
        from dicomweb_client import DICOMwebClient
    except ImportError as exc:
        missing = exc.name or "dicomweb-client"
        raise MissingDependencyError("the PACS (DICOMweb) support is not installed",
                                     expected="the dicomweb-client and requests packages", found=f"no module named {missing}",
                                     fix='pip install "medseg[pacs]"') from None
    return requests, DICOMwebClient


class DicomWeb:
    """A small DICOMweb client (QIDO-RS, WADO-RS, STOW-RS) with clear errors."""

    def __init__(self, url: str, credentials: Credentials | None = None, timeout: float = 60.0) -> None:
        self.url = check_url(url)
        self._requests, DICOMwebClient = import_dicomweb()
        session = self._requests.Session()
        if credentials is not None:
            session.auth = (credentials.username, credentials.password)
        self.client = DICOMwebClient(url=self.url, session=session, timeout=timeout)
        # retry busy servers (429/503...) a few times, quickly; a refused connection fails at once
        self.client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=200)

    def _call(self, what: str, fn, *args, **kwargs):
        requests = self._requests
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.ConnectionError:
            raise PacsError("cannot reach the DICOMweb server", path=self.url, found="connection refused or no route",
                            fix="check the URL and that the server is running") from None
        except requests.exceptions.Timeout:
            raise PacsError(f"DICOMweb server timed out during {what}", path=self.url, fix="try again later") from None
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            fix = {401: f"set {ENV_USER}/{ENV_PASSWORD} or --credentials FILE",
                   403: "ask for access rights on the server",
                   404: "check the study/series UID (medseg pacs list shows what is there)"}.get(code, "see the server log")
            raise PacsError(f"DICOMweb {what} failed with HTTP {code}", path=self.url, fix=fix) from None

    def _paged(self, what: str, fn, key: str, *args, page: int = 200, **kwargs) -> list[dict]:
        """All results of a QIDO search, page by page; stops when a page brings nothing new
        (some servers ignore ``offset`` and would otherwise be asked forever)."""
        seen: dict[str, dict] = {}
        offset = 0
        while True:
            batch = self._call(what, fn, *args, limit=page, offset=offset, **kwargs) or []
            new = {e.get(key, {}).get("Value", [None])[0]: e for e in batch}
            fresh = {k: v for k, v in new.items() if k not in seen}
            seen.update(fresh)
            if len(batch) < page or not fresh:
                return list(seen.values())
            offset += len(batch)

    def studies(self, filters: dict | None = None) -> list[dict]:
        return self._paged("study search", self.client.search_for_studies, "0020000D", search_filters=filters or {})

    def series(self, study_uid: str) -> list[dict]:
        return self._paged("series search", self.client.search_for_series, "0020000E", study_uid)

    def download_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        datasets = self._call("series retrieval", self.client.retrieve_series, study_uid, series_uid)
        if not datasets:
            raise PacsError("series has no instances", path=self.url, found=f"series {series_uid}",
                            fix="check the series UID")
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in datasets:
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths

    def download_study(self, study_uid: str, folder: Path) -> list[Path]:
        found = self.series(study_uid)
        if not found:
            raise PacsError("study not found or empty", path=self.url, found=f"study {study_uid}",
                            fix="check the study UID")
        paths = []
        for s in found:
            series_uid = s["0020000E"]["Value"][0]
            paths += self.download_series(study_uid, series_uid, folder / series_uid)
        return paths

    def store(self, paths: list[Path]) -> None:
        import pydicom

        self._call("store (STOW-RS)", self.client.store_instances, [pydicom.dcmread(p) for p in paths])


def _uid(entry: dict, tag: str) -> str:
    return entry[tag]["Value"][0]


@dataclass
class PacsResult:
    series_uid: str
    seg_path: Path | None
    """Where the SEG was kept (None without an output folder: only the PACS copy remains)."""
    seg_sop_uid: str
    stored: bool


def pacs_predict(url: str, study_uid: str, *, series_uid: str | None = None, model: str | None = None,
                 rules: str | Path | None = None, credentials: str | Path | None = None, device: str = "auto",
                 outdir: str | Path | None = None, store: bool = True, dicom_options: dict | None = None,
                 log=None, formats: list[str] | None = None) -> list[PacsResult]:
    """Segment a study (the series chosen by ``series_uid`` or ``rules``) and store DICOM SEGs back (``formats``:
    ``dicom-seg`` and/or ``rtstruct``; the result names the first).

    The downloaded images are deleted afterwards; the SEG files are kept only in ``outdir``.
    """
    import shutil

    import pydicom

    from medseg.inference.predictor import Predictor
    from medseg.apps.run import run_items
    from medseg.io.rules import load_rules
    from medseg.io.sources import discover

    say = log or (lambda msg: None)
    web = DicomWeb(url, load_credentials(credentials))
    work = Path(tempfile.mkdtemp(prefix="medseg-pacs-"))
    try:
        if series_uid:
            web.download_series(study_uid, series_uid, work / "study" / series_uid)
        else:
            web.download_study(study_uid, work / "study")
        items, skipped = discover([work / "study"], load_rules(rules))
        items = [it for it in items if it.kind == "dicom"]
        if not items:
            raise PacsError("no series of the study passed the selection rules", path=url,
                            found="; ".join(s.reason for s in skipped[:5]) or "no image series",
                            fix="pass --series UID or other --rules")
        say(f"{len(items)} series to segment, {len(skipped)} skipped")
        out = Path(outdir) if outdir else work / "out"
        predictor = Predictor(model, device=device)
        results = []
        formats = list(dict.fromkeys(formats or ["dicom-seg"]))
        bad = [f for f in formats if f not in ("dicom-seg", "rtstruct")]
        if bad:
            raise ConfigError("pacs predict stores DICOM objects only", expected="dicom-seg | rtstruct",
                              found=", ".join(bad), fix="use --format dicom-seg and/or --format rtstruct")
        for res in run_items(predictor, items, lambda it: out / it.name, formats, dicom_options=dicom_options):
            written = res.outputs
            if store:
                web.store(written)
            sop = str(pydicom.dcmread(written[0], stop_before_pixels=True).SOPInstanceUID)
            results.append(PacsResult(res.item.series.series_uid, written[0] if outdir else None, sop, store))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_query(items: list[str] | None) -> dict:
    """``["ModalitiesInStudy=MR", "StudyDate=20240101-20241231"]`` -> QIDO-RS search filters."""
    filters = {}
    for item in items or []:
        for part in item.split("&"):
            if "=" not in part:
                raise ConfigError("bad --query", expected="KEY=VALUE (DICOM keyword), e.g. ModalitiesInStudy=MR",
                                  found=repr(part), fix="write each filter as KEY=VALUE")
            key, value = part.split("=", 1)
            filters[key.strip()] = value.strip()
    return filters


def download_studies(url: str, filters: dict, cache: Path, *, credentials: str | Path | None = None,
                     log=None) -> int:
    """Download every study matching ``filters`` into ``cache/study-<hash>/`` (complete studies only)."""
    import shutil

    from medseg.io.sources import short_hash

    say = log or (lambda msg: None)
    web = DicomWeb(url, load_credentials(credentials))
    studies = web.studies(filters)
    say(f"{len(studies)} studies match the query")
    for entry in studies:
        uid = _uid(entry, "0020000D")
        final = cache / f"study-{short_hash(uid)}"
        if (final / ".complete").is_file():
            continue
        partial = cache / f".partial-{short_hash(uid)}"
        shutil.rmtree(partial, ignore_errors=True)
        web.download_study(uid, partial)
        (partial / ".complete").write_text(uid + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    return len(studies)
