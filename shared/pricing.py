"""What Gemini and RunPod charge: the price table the settings hold, the cost of a run's tokens and
RunPod time as recorded, and the token estimates a quote makes before anything runs.

Money is counted in integer micro-dollars (1 USD = 1,000,000), so Redis adds it with HINCRBY and
no rounding accumulates; a price in USD per million tokens is exactly micro-dollars per token.

Sources (checked 2026-12-03):
- Gemini prices, https://ai.google.dev/gemini-api/docs/pricing: gemini-2.5-flash-image, input $0.30
  per 1M tokens (text and image), output $30 per 1M tokens ("1290 tokens per image", $0.039 an
  image); gemini-3-pro-image-preview, input $2 per 1M, image output $120 per 1M ($0.134 for a 1K or
  2K image of 1,120 tokens, $0.24 for a 4K image of 2,000). The Batch API costs 50 % of that
  (https://ai.google.dev/gemini-api/docs/batch-mode).
- Tokens counted: about 4 characters of text a token (https://ai.google.dev/gemini-api/docs/tokens)
  and 258 tokens an input image of at most 384 px a side (image-understanding page; larger images
  are cut into 768 px tiles of 258 each, so a quote undercounts big references). The output tokens
  of an image are the image-generation page's figures above. These are exactly what the project's
  Gemini emulator counts (deploy/emulators/gemini/responses.py `usage`, catalog.py).
- The worker asks for IMAGE output only (worker/gemini_client.py `build_config`), so every
  candidate token it reports is an image token and is priced at the image output price.
  gemini-3-pro-image-preview also bills its thinking tokens as output; the worker does not report
  them (usageMetadata.thoughtsTokenCount), so neither the record nor the quote counts them.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from shared import planning
from shared.gemini_models import FLASH_IMAGE, PRO_IMAGE
from shared.models import SemiAutoJobRequest
from shared.planning import JobConfig

if TYPE_CHECKING:
    from shared.settings import Settings

MICROS_PER_USD = 1_000_000
TOKENS_PER_INPUT_IMAGE = 258
CHARS_PER_TOKEN = 4


class LanePrices(BaseModel):
    """USD per million tokens in one lane."""

    model_config = ConfigDict(extra="forbid")

    input_usd_per_million: float = Field(ge=0)
    output_usd_per_million: float = Field(ge=0)


class ModelPrices(BaseModel):
    """A model's prices: through RunPod runs (Gemini's interactive API) and through the Batch API."""

    model_config = ConfigDict(extra="forbid")

    realtime: LanePrices
    batch: LanePrices

    def lane(self, lane: str) -> LanePrices:
        return self.batch if lane == "batch" else self.realtime


def _prices(input_usd: float, output_usd: float) -> ModelPrices:
    """Interactive prices, and the Batch API's at half of them."""
    return ModelPrices(
        realtime=LanePrices(input_usd_per_million=input_usd, output_usd_per_million=output_usd),
        batch=LanePrices(input_usd_per_million=input_usd / 2, output_usd_per_million=output_usd / 2),
    )


DEFAULT_GEMINI_PRICES: dict[str, ModelPrices] = {
    FLASH_IMAGE: _prices(0.30, 30.0),
    PRO_IMAGE: _prices(2.0, 120.0),
}

# Output tokens of one image by model and image_size (None: the model's default, 1K).
OUTPUT_TOKENS_PER_IMAGE: dict[str, dict[str | None, int]] = {
    FLASH_IMAGE: {None: 1290},
    PRO_IMAGE: {None: 1120, "1K": 1120, "2K": 1120, "4K": 2000},
}


def usd(micros: int | float) -> float:
    """Micro-dollars as USD, to the micro-dollar (how the API shows money)."""
    return round(micros / MICROS_PER_USD, 6)


def gemini_micros(prices: LanePrices, prompt_tokens: int, output_tokens: int) -> int:
    """What Gemini charges for these tokens, in micro-dollars (USD per 1M tokens = micro-USD per token)."""
    return round(prompt_tokens * prices.input_usd_per_million + output_tokens * prices.output_usd_per_million)


def runpod_micros(execution_ms: int | float, usd_per_second: float) -> int:
    """RunPod's price for this much execution time, in micro-dollars."""
    return round(execution_ms * usd_per_second * MICROS_PER_USD / 1000)


def lane_prices(settings: "Settings", lane: str, model: str | None = None) -> LanePrices:
    """The configured model's prices in `lane` (Settings checks at start that the table has them)."""
    return settings.gemini_prices[model or settings.gemini_model].lane(lane)


@dataclass(frozen=True, slots=True)
class RunCost:
    """What one recorded run attempt cost (Completion.args carries it to complete_run.lua)."""

    lane: str
    prompt_tokens: int
    output_tokens: int
    gemini_micros: int
    runpod_ms: int
    runpod_micros: int

    @property
    def micros(self) -> int:
        return self.gemini_micros + self.runpod_micros


def run_cost(settings: "Settings", lane: str, prompt_tokens: int, output_tokens: int, runpod_ms: int) -> RunCost:
    """A run's cost from the tokens Gemini reported and the execution time RunPod reported (the batch
    lane has no RunPod time)."""
    prices = lane_prices(settings, lane)
    return RunCost(
        lane=lane,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        gemini_micros=gemini_micros(prices, prompt_tokens, output_tokens),
        runpod_ms=runpod_ms,
        runpod_micros=runpod_micros(runpod_ms, settings.runpod_price_per_second_usd),
    )


# --- estimates, before anything runs (quotes, budget checks) ---


def text_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN


def output_tokens_per_image(model: str, image_size: str | None) -> int:
    """An image's output tokens; a model not listed counts as gemini-2.5-flash-image (as
    shared/gemini_models.spec_for treats it)."""
    table = OUTPUT_TOKENS_PER_IMAGE.get(model, OUTPUT_TOKENS_PER_IMAGE[FLASH_IMAGE])
    return table.get(image_size, table[None])


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    prompt_tokens: int
    output_tokens: int


def estimate_tokens(config: JobConfig, model: str, indices: Sequence[int] | None = None) -> TokenEstimate:
    """Tokens of the job's images (or of `indices` only, for a redo), as Gemini counts each call: the
    prompt's text and every input image the call carries (automatic: its input; semi-automatic:
    every reference), and the model's tokens per image out. Closed form for a whole job: a
    100,000-image job costs no more to quote than a small one."""
    per_image_out = output_tokens_per_image(model, config.params.image_size)
    if indices is None:
        images = planning.images_total(config)
        if isinstance(config, SemiAutoJobRequest):
            refs = TOKENS_PER_INPUT_IMAGE * len(config.reference_ids)
            prompt = sum(text_tokens(p) + refs for p in config.prompts) * config.images_per_prompt
        else:
            prompt = images * (text_tokens(config.base_prompt) + TOKENS_PER_INPUT_IMAGE)
        return TokenEstimate(prompt, images * per_image_out)
    prompt = 0
    for index in indices:
        slot = planning.slot(config, index)
        prompt += text_tokens(slot.prompt) + TOKENS_PER_INPUT_IMAGE * len(slot.reference_ids)
    return TokenEstimate(prompt, len(indices) * per_image_out)


def runs_for(config: JobConfig, run_size: int, indices: Sequence[int] | None = None) -> int:
    """Runs the job's images (or a redo of `indices`, cut in runs of `run_size`) take."""
    if indices is None:
        return planning.runs_total(config, run_size)
    return math.ceil(len(indices) / run_size)
