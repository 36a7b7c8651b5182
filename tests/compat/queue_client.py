"""A client of the queue management API written from its document alone
(/work/shared/seeds/004: `src/routes/api/queue/*`): the paths, bodies and answers below are copied
from it, not from Bunch's code. Batches are made beforehand (in Bunch: POST /api/batches)."""

from typing import Any

import httpx


class QueueApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


class QueueClient:
    def __init__(self, http: httpx.AsyncClient, project_id: str) -> None:
        self.http = http
        self.project_id = project_id

    async def _answer(self, response: httpx.Response) -> dict[str, Any]:
        body: dict[str, Any] = response.json()
        if not response.is_success or body.get("success") is not True:
            raise QueueApiError(response.status_code, body)
        return body

    async def enqueue(self, batch_ids: list[str], priority: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"projectId": self.project_id}
        if len(batch_ids) == 1:
            body["batchId"] = batch_ids[0]
        else:
            body["batchIds"] = batch_ids
        if priority is not None:
            body["priority"] = priority
        return await self._answer(await self.http.post("/api/queue/enqueue", json=body))

    async def status(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = (await self._answer(await self.http.get(f"/api/queue/status/{job_id}")))["job"]
        return job

    async def retry(self, job_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"projectId": self.project_id}
        if job_id is None:
            body["retryAll"] = True
        else:
            body["jobId"] = job_id
        return await self._answer(await self.http.post("/api/queue/retry", json=body))

    async def redo(
        self,
        batch_id: str,
        row_index: int,
        redo_column_ids: list[str],
        cropped_image_ids: dict[str, str],
        source_image_ids: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "batchId": batch_id,
            "projectId": self.project_id,
            "rowIndex": row_index,
            "redoColumnIds": redo_column_ids,
            "croppedImageIds": cropped_image_ids,
        }
        if source_image_ids is not None:
            body["sourceImageIds"] = source_image_ids
        return await self._answer(await self.http.post("/api/queue/redo", json=body))

    async def cancel(self, batch_ids: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"projectId": self.project_id}
        if batch_ids is not None:
            body["batchIds"] = batch_ids
        return await self._answer(await self.http.post("/api/queue/cancel", json=body))

    async def stats(self) -> dict[str, Any]:
        return await self._answer(await self.http.get("/api/queue/stats", params={"projectId": self.project_id}))

    async def metrics(self, time_range: str = "24h") -> dict[str, Any]:
        params = {"projectId": self.project_id, "timeRange": time_range}
        return await self._answer(await self.http.get("/api/queue/metrics", params=params))
