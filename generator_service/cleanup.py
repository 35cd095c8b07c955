"""Deleting a job's objects from storage: the one deletion the project has (DeleteJobObjects).

JobService's sweeper calls it for the objects of attempts that did not deliver (keeping the job's recorded
images), and the same call with nothing to keep deletes everything of a job. The job's folder is built here
from two ids that must be UUIDs in their canonical form: a key is never built from anything else a caller sent,
so no `..`, `/` or prefix trick reaches outside `{user_id}/{job_id}/`.
"""

from __future__ import annotations

import structlog

from generator_service.domain import id_violations, invalid_request, job_folder
from generator_service.storage.base import MAX_LISTED, Storage
from imagegen_common.errors import FieldViolation

log = structlog.get_logger(__name__)

MAX_KEEP_PATHS = 1_000
MAX_PATH_CHARS = 1_024


def validate_delete(user_id: str, job_id: str, keep_paths: list[str]) -> None:
    # The ids as uploads check them (domain.job_folder): the folder is built from nothing else.
    problems = id_violations(user_id, job_id)
    if len(keep_paths) > MAX_KEEP_PATHS:
        problems.append(FieldViolation("keep_paths", f"at most {MAX_KEEP_PATHS} paths"))
    elif any(len(path) > MAX_PATH_CHARS for path in keep_paths):
        problems.append(FieldViolation("keep_paths", f"each at most {MAX_PATH_CHARS} characters"))
    if problems:
        raise invalid_request(problems)


class ObjectCleaner:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def delete_job_objects(self, user_id: str, job_id: str, keep_paths: list[str]) -> list[str]:
        """Deletes what is in the job's folder and not in `keep_paths`; returns the keys deleted."""
        validate_delete(user_id, job_id, keep_paths)
        folder = job_folder(user_id, job_id)
        keep = set(keep_paths)
        deleted: list[str] = []
        while True:
            listed = await self._storage.list_folder(folder)
            doomed = [key for key in listed if key not in keep]
            if doomed:
                await self._storage.delete(doomed)
                deleted += doomed
            # A listing is bounded (MAX_LISTED keys); a full one that had something to delete may
            # have left more behind it. One that had nothing to delete is all kept objects: done.
            if not doomed or len(listed) < MAX_LISTED:
                break
        if deleted:
            log.info("job objects deleted", user_id=user_id, job_id=job_id, deleted=len(deleted), kept=len(keep))
        return deleted
