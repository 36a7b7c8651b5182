"""POST /internal/runpod/webhook: RunPod's completion callback, trusted only with a token we issued.

The token (shared/tokens.py) names the run and attempt it was issued for. A callback is passed on
to the dispatcher (keys.TASK_RESULTS_STREAM) only when it can still matter: its attempt is the
run's current one and the run is still waiting for its outcome. A callback about a run already
settled (final, canceled, retried as a newer attempt) is answered 200 and changes nothing, so
RunPod stops retrying it. Once RunPod's job id for the attempt is known, a body about any other
RunPod job is refused: a token seen once cannot carry another run's results.
"""

from typing import Any

from fastapi import APIRouter, Query, Request, status

from services.gateway.deps import ProjectDep, ServicesDep
from services.gateway.schemas.common import API_PROBLEMS, problems
from services.gateway.schemas.operations import WebhookAnswer, WebhookSecret
from shared import bounded_json, task_results, tokens
from shared.errors import Forbidden, TooLarge, Unauthenticated, Unreadable
from shared.models import RunStatus
from shared.webhook_signing import project_webhook_secret

router = APIRouter(prefix="/internal/runpod", tags=["internal"])
secrets_router = APIRouter(prefix="/api/webhooks", tags=["webhooks"], responses=API_PROBLEMS)

MAX_BODY = 1024 * 1024


@router.post(
    "/webhook",
    status_code=status.HTTP_200_OK,
    response_model=WebhookAnswer,
    responses=problems(
        400,
        401,
        403,
        413,
        422,
        503,
        described={
            401: "No webhook token",
            403: "A token Bunch did not issue, altered or expired, or a body about another RunPod job",
        },
    ),
)
async def receive_runpod_webhook(
    request: Request, services: ServicesDep, token: str = Query("", max_length=512)
) -> WebhookAnswer:
    if not token:
        raise Unauthenticated("Missing webhook token.")
    claim = tokens.verify(services.settings.webhook_secret.get_secret_value(), token)
    if claim is None:
        raise Forbidden("Invalid or expired webhook token.")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise TooLarge("Webhook body too large.")
    try:
        # Bounded: Python's parser recurses per level (RecursionError, a 500). Whatever its declared
        # type the body is parsed here, so the gateway's check of JSON bodies alone would not do.
        body: Any = bounded_json.loads(raw) if raw else {}
    except bounded_json.TooDeep as exc:
        raise Unreadable(f"The webhook body nests deeper than {exc.max_depth} levels.") from None
    except ValueError:
        raise Unreadable("Webhook body is not JSON.") from None
    run_status = body.get("status") if isinstance(body, dict) else None
    if not isinstance(run_status, str) or not run_status:
        # RunPod sometimes posts empty bodies; the dispatcher's /status polling covers those runs.
        return WebhookAnswer(accepted=False, reason="empty body")
    run = await services.runs.run(claim.run_id)
    current = run is not None and (run.attempt, run.claim) == (claim.attempt, claim.claim)
    if run is not None and current and run.runpod_id and body.get("id") != run.runpod_id:
        raise Forbidden("The webhook body is about another RunPod job than its token was issued for.")
    if run is None or not current or run.status != RunStatus.DISPATCHED:
        return WebhookAnswer(accepted=False, reason="the run's outcome for this attempt is already settled")
    await task_results.publish(services.redis, claim.run_id, claim.attempt, claim.claim, body, "webhook")
    return WebhookAnswer(accepted=True)


@secrets_router.get("/secret", response_model=WebhookSecret)
async def get_webhook_signing_secret(project: ProjectDep, services: ServicesDep) -> WebhookSecret:
    """The secret this project's webhook receivers verify `Bunch-Signature` with."""
    return WebhookSecret(secret=project_webhook_secret(services.settings, project))
