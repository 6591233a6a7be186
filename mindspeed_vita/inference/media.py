"""Media parts of an API request (`image_url` / `video_url`) -> files the renderer can read.

Accepted: `data:` URIs (base64 payloads, written to a private temporary directory), and local
paths or `file://` URLs ONLY when the server was started with `--allow-local-media DIR`; then
the path, with every symlink resolved, must lie inside DIR. Remote URLs are refused: the server
fetches nothing from the network.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from typing import Optional
from urllib.parse import unquote, urlparse

from mindspeed_vita.errors import UserInputError

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)"
                       r"(?P<b64>;base64)?,(?P<payload>.*)$", re.DOTALL)
_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg",
               "image/webp": ".webp", "image/gif": ".gif", "image/bmp": ".bmp",
               "video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv",
               "video/quicktime": ".mov", "video/avi": ".avi", "video/x-msvideo": ".avi"}


class MediaError(UserInputError):
    """A media part the server cannot use; the message says which part and why."""


class MediaResolver:
    """Turns the URLs of one request into readable files; `close()` deletes what it wrote."""

    def __init__(self, allow_local_media: Optional[str] = None):
        self.allowed_dir = os.path.realpath(allow_local_media) if allow_local_media else None
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._count = 0

    def resolve(self, url: str, where: str) -> str:
        """A local file path for `url`; `where` names the part in error messages
        (e.g. "messages[1].content[0].image_url")."""
        if not isinstance(url, str) or not url:
            raise MediaError(f"{where}: url must be a non-empty string")
        if url.startswith("data:"):
            return self._write_data_uri(url, where)
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https", "ftp", "s3", "gs"):
            raise MediaError(f"{where}: remote URLs ({scheme}://) are not fetched; send the "
                             f"media inline as a data: URI")
        path = unquote(urlparse(url).path) if scheme == "file" else url
        if scheme not in ("", "file") and not (len(scheme) == 1 and os.name == "nt"):
            raise MediaError(f"{where}: unsupported URL scheme {scheme!r}")
        return self._local_path(path, where)

    def _local_path(self, path: str, where: str) -> str:
        if self.allowed_dir is None:
            raise MediaError(f"{where}: local file paths are disabled on this server (start it "
                             f"with --allow-local-media DIR to allow files under DIR)")
        real = os.path.realpath(path if os.path.isabs(path)
                                else os.path.join(self.allowed_dir, path))
        if os.path.commonpath([real, self.allowed_dir]) != self.allowed_dir:
            raise MediaError(f"{where}: {path!r} is outside the allowed media directory")
        if not os.path.exists(real):
            raise MediaError(f"{where}: {path!r} does not exist")
        return real

    def _write_data_uri(self, url: str, where: str) -> str:
        match = _DATA_URI.match(url)
        if match is None or not match.group("b64"):
            raise MediaError(f"{where}: a data: URI must be base64 encoded "
                             f"(data:<mime>;base64,<payload>)")
        try:
            payload = base64.b64decode(match.group("payload"), validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(f"{where}: the data: URI payload is not valid base64") from None
        if not payload:
            raise MediaError(f"{where}: the data: URI payload is empty")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mindspeed-vita-media-")
        self._count += 1
        ext = _EXTENSIONS.get((match.group("mime") or "").lower(), ".bin")
        path = os.path.join(self._tmp.name, f"part{self._count}{ext}")
        with open(path, "wb") as f:
            f.write(payload)
        return path

    def close(self) -> None:
        """Delete the files written for this request."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
