"""Prepare the bucket: `python -m shared.bucket_setup` (compose's one-shot `s3-setup`; the packager
does the same at start).

Creates BUNCH_S3_BUCKET when it is missing and adds the rule that aborts multipart uploads left
unfinished for a day. Exits 0 when the bucket is ready, 1 with the reason when it cannot be.
"""

import asyncio
import logging
import sys

import urllib3
from minio.error import S3Error

from shared.settings import get_settings
from shared.storage import Storage

log = logging.getLogger(__name__)


async def prepare_bucket(storage: Storage) -> None:
    await storage.ensure_bucket()
    if not await storage.ensure_upload_cleanup():
        log.warning(
            "the object store has no lifecycle rules: add one that aborts incomplete multipart uploads "
            "of bucket %s yourself, or a killed ZIP writer's parts stay stored",
            storage.bucket,
        )


async def _setup(attempts: int = 30) -> str | None:
    storage = Storage(get_settings())
    for attempt in range(1, attempts + 1):
        try:
            await prepare_bucket(storage)
            return None
        except S3Error as exc:
            # A 4xx (bad credentials, a bucket owned by another account): waiting will not help.
            if exc.response is None or exc.response.status < 500 or attempt == attempts:
                return f"{exc.code}: {exc.message}"
        except ValueError as exc:  # minio refuses a bucket name before asking the store
            return str(exc)
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # the store is still starting
            if attempt == attempts:
                return f"the object store did not answer: {exc}"
        await asyncio.sleep(min(2.0, 0.2 * attempt))
    return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    problem = asyncio.run(_setup())
    if problem:
        print(f"bucket setup failed: {problem}", file=sys.stderr)
    else:
        print(f"bucket {get_settings().s3_bucket} is ready")
    sys.exit(1 if problem else 0)
