"""The bodies of the dataset routes (/api/datasets)."""

from datetime import datetime

from pydantic import BaseModel


class Rejected(BaseModel):
    name: str
    reason: str


class DatasetCreated(BaseModel):
    id: str
    count: int
    rejected: list[Rejected]
    created_at: datetime


class DatasetView(BaseModel):
    id: str
    count: int
    created_at: datetime
