"""The bodies of POST /api/uploads."""

from pydantic import BaseModel


class UploadInfo(BaseModel):
    id: str
    sha256: str
    width: int
    height: int
    format: str
    bytes: int


class UploadsCreated(BaseModel):
    uploads: list[UploadInfo]
