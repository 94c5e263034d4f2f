"""pgdispatch: reliable outbound integrations, straight from PostgreSQL.

The public API, and all of it (everything else in the package is internal):

    App                 register executors for your own kinds; app.drain(conn) runs them inline
    Job                 what an executor receives (job.args, job.attempt, job.connection(), ...)
    Done, Retry, Discard, Postpone, Outcome     what an executor returns (None counts as Done)
    InvalidJob          raise it when a job's args can never run: dead-lettered as 'invalid'
    enqueue, enqueue_many, NewJob               insert jobs in the caller's transaction
    start_process; StepDone, StepRetry, StepError   processes (App.process) and what their steps return
    DrainResult, KindOptions
    PgDispatchError     the root of every error pgdispatch raises (InvalidInput,
                        DatabaseUnavailable, ConfigurationError, NotFound, NotAllowed, SchemaMissing)
"""

from pgdispatch.db.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidInput,
    NotAllowed,
    NotFound,
    PgDispatchError,
    SchemaMissing,
)
from pgdispatch.db.producer import NewJob, enqueue, enqueue_many, start_process
from pgdispatch.worker.app import App, KindOptions
from pgdispatch.worker.inline import DrainResult
from pgdispatch.worker.job import Job
from pgdispatch.worker.outcome import Discard, Done, InvalidJob, Outcome, Postpone, Retry
from pgdispatch.worker.processes import StepDone, StepError, StepRetry

__all__ = [
    "App",
    "ConfigurationError",
    "DatabaseUnavailable",
    "Discard",
    "Done",
    "DrainResult",
    "InvalidInput",
    "InvalidJob",
    "Job",
    "KindOptions",
    "NewJob",
    "NotAllowed",
    "NotFound",
    "Outcome",
    "PgDispatchError",
    "Postpone",
    "Retry",
    "SchemaMissing",
    "StepDone",
    "StepError",
    "StepRetry",
    "enqueue",
    "enqueue_many",
    "start_process",
]
