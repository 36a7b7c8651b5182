/** The API's bodies, named by route rather than by schema name: they survive renames of the
 * description's components and operation ids. */

import type { paths } from "./generated/schema.js";

type Json<T> = T extends { content: { "application/json": infer Body } } ? Body : never;

/** The body of `POST /api/jobs`: a semi-automatic or an automatic job (`mode`). */
export type JobRequest = Json<paths["/api/jobs"]["post"]["requestBody"]>;
export type SemiAutoJobRequest = Extract<JobRequest, { mode: "semi_auto" }>;
export type AutomaticJobRequest = Extract<JobRequest, { mode: "automatic" }>;
/** `202` of `POST /api/jobs`: the job's id, status and links. */
export type JobAccepted = Json<paths["/api/jobs"]["post"]["responses"][202]>;
/** `GET /api/jobs/{job_id}/status`. */
export type JobStatusView = Json<paths["/api/jobs/{job_id}/status"]["get"]["responses"][200]>;
export type JobStatus = JobStatusView["status"];
/** `201` of `POST /api/uploads`. */
export type UploadsCreated = Json<paths["/api/uploads"]["post"]["responses"][201]>;
export type UploadInfo = UploadsCreated["uploads"][number];

/** Every error answer: `detail` says what went wrong and what to change. */
export type Problem = Json<paths["/api/jobs/{job_id}/status"]["get"]["responses"][404]>;
/** 422: `errors` lists the problems per field, when they are per field. */
export type ValidationProblem = Json<paths["/api/jobs"]["post"]["responses"][422]>;
export type FieldError = NonNullable<ValidationProblem["errors"]>[number];
/** 402: what the job would cost and where the project's budget stands (USD). */
export type OverBudgetProblem = Json<paths["/api/jobs"]["post"]["responses"][402]>;
export type BudgetFigures = Omit<OverBudgetProblem, "detail">;

/** The statuses after which a job changes no more. */
export const FINAL_STATUSES: ReadonlySet<JobStatus> = new Set<JobStatus>(["completed", "failed", "canceled"]);

export function isFinalStatus(status: string | null | undefined): status is "completed" | "failed" | "canceled" {
  return status != null && FINAL_STATUSES.has(status as JobStatus);
}
