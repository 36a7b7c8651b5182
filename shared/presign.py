"""SigV4 presigned URLs (query-string auth, UNSIGNED-PAYLOAD) for path-style endpoints.

The dispatcher presigns five links per run and the results view one per image. minio's
presigned_*_object formats datetimes, parses and splits the URL and derives the signing key anew for
each link; this derives the key once a day and builds the URL from strings, several times faster
(bench/RESULTS.md has the figures). It covers the endpoints minio addresses path-style (MinIO,
moto, most S3 servers); AWS and Aliyun hosts, which minio addresses virtual-host style, stay with
minio (`path_style_endpoint`). tests/test_presign.py checks the output byte for byte against minio's.
"""

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
_VIRTUAL_HOST_DOMAINS = (".amazonaws.com", ".amazonaws.com.cn", ".aliyuncs.com")


def path_style_endpoint(endpoint_url: str) -> bool:
    host = (urlsplit(endpoint_url).hostname or "").lower()
    return not any(host == domain[1:] or host.endswith(domain) for domain in _VIRTUAL_HOST_DOMAINS)


def _encode(value: str) -> str:
    return quote(value, safe="")


class Presigner:
    def __init__(self, endpoint_url: str, region: str, access_key: str, secret_key: str) -> None:
        parts = urlsplit(endpoint_url)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.netloc
        self._region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self._day = ""
        self._signing_key = b""

    def _key_for(self, day: str) -> bytes:
        if day != self._day:
            key = f"AWS4{self._secret_key}".encode()
            for part in (day, self._region, "s3", "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._day, self._signing_key = day, key
        return self._signing_key

    def url(
        self,
        method: str,
        bucket: str,
        key: str,
        expires_seconds: int,
        query: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> str:
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        day = amz_date[:8]
        scope = f"{day}/{self._region}/s3/aws4_request"
        path = f"/{bucket}/{quote(key, safe='/')}"
        # Extra parameters first, then the X-Amz-* ones: the order minio writes them in.
        pairs = [(_encode(name), _encode(value)) for name, value in sorted((query or {}).items())]
        pairs += [
            ("X-Amz-Algorithm", ALGORITHM),
            ("X-Amz-Credential", _encode(f"{self._access_key}/{scope}")),
            ("X-Amz-Date", amz_date),
            ("X-Amz-Expires", str(expires_seconds)),
            ("X-Amz-SignedHeaders", "host"),
        ]
        canonical_query = "&".join(f"{name}={value}" for name, value in sorted(pairs))
        canonical_request = f"{method}\n{path}\n{canonical_query}\nhost:{self._host}\n\nhost\nUNSIGNED-PAYLOAD"
        string_to_sign = f"{ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(canonical_request.encode()).hexdigest()}"
        signature = hmac.new(self._key_for(day), string_to_sign.encode(), hashlib.sha256).hexdigest()
        query_string = "&".join(f"{name}={value}" for name, value in pairs)
        return f"{self._origin}{path}?{query_string}&X-Amz-Signature={signature}"
