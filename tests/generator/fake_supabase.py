"""Fake Supabase Storage: the REST routes supabase-py's storage3 uses, answering like supabase/storage v1.

Stands in for `{SUPABASE_URL}/storage/v1` (external-apis.md §3 and §6):
- POST /storage/v1/object/{bucket}/{path}: upload (multipart form with a `file` part, or a raw
  body), `x-upsert: true` to overwrite; answers {"Key": "bucket/path", "Id": ...}.
- POST /storage/v1/object/sign/{bucket}/{path} with {"expiresIn"}: answers
  {"signedURL": "/object/sign/{bucket}/{path}?token=..."} (relative, as the real server does).
- GET /storage/v1/object/public/{bucket}/{path} (public buckets only), GET /storage/v1/object/sign/...?token=.
- POST /storage/v1/object/list/{bucket} with {"prefix", "limit", "offset", "sortBy"}: the entries directly in the
  folder `prefix`, sorted by name; a sub-folder is an entry whose id (and metadata) is null.
- DELETE /storage/v1/object/{bucket} with {"prefixes": [keys]}: deletes those objects and answers the rows of the
  ones it deleted (a key without an object is skipped, not an error).
- GET /storage/v1/bucket/{id}: the bucket (`id`, `name`, `owner`, `public`, `file_size_limit`,
  `allowed_mime_types`, `created_at`, `updated_at`, `type`), as storage3's `get_bucket` reads it.
- GET /storage/v1/object/{bucket}/{path} with the service key: an authenticated download (storage3's `download`).
Errors come back as HTTP 400 with the real status in the body's `statusCode` string, like the real server: a
missing bucket is statusCode "404" "Bucket not found"; a request without an Authorization header statusCode "400"
(InvalidRequest); a wrong key statusCode "403".
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP

from tests.generator.fake_google import Fault
from tests.generator.fake_http import Exchange, FakeService, RecordedRequest, Reply


@dataclass
class StoredObject:
    data: bytes
    content_type: str


def storage_error(status_code: str, error: str, message: str, code: str, http_status: int = 400) -> Reply:
    return Reply.json({"statusCode": status_code, "error": error, "message": message, "code": code}, http_status)


def storage_fault(reply: Reply) -> Fault:
    async def answer(exchange: Exchange) -> Reply:
        return reply

    return answer


def _file_part(request: RecordedRequest) -> StoredObject:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return StoredObject(request.body, content_type)
    message = BytesParser(policy=HTTP).parsebytes(f"content-type: {content_type}\r\n\r\n".encode() + request.body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return StoredObject(payload, part.get_content_type())
    raise AssertionError("multipart upload without a `file` part")


class FakeSupabaseStorage(FakeService):
    def __init__(self, service_key: str = "test-service-key", bucket: str = "images", public: bool = True) -> None:
        self.service_key = service_key
        self.buckets = {bucket: public}
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.tokens: dict[str, tuple[str, str]] = {}
        self.sign_requests: list[dict[str, object]] = []
        # A misconfigured proxy that drops x-upsert: every upload then behaves as a first upload.
        self.ignore_upsert = False
        self.upload_faults: deque[Fault] = deque()
        self.list_faults: deque[Fault] = deque()
        self.delete_faults: deque[Fault] = deque()
        super().__init__()

    async def _handle(self, exchange: Exchange) -> Reply:
        request = exchange.request
        path = request.path.removeprefix("/storage/v1")
        if request.method == "GET" and path.startswith("/object/public/"):
            return self._read_public(path.removeprefix("/object/public/"))
        if request.method == "GET" and path.startswith("/object/sign/"):
            return self._read_signed(path.removeprefix("/object/sign/"), request)
        if "authorization" not in request.headers:
            return storage_error(
                "400", "Error", "headers must have required property 'authorization'", "InvalidRequest"
            )
        if not self._authorized(request):
            return storage_error("403", "Unauthorized", "signature verification failed", "AccessDenied")
        if request.method == "GET" and path.startswith("/bucket/"):
            return self._bucket(path.removeprefix("/bucket/"))
        if request.method == "POST" and path.startswith("/object/sign/"):
            return self._sign(path.removeprefix("/object/sign/"), request)
        if request.method == "POST" and path.startswith("/object/list/"):
            if self.list_faults:
                return await self.list_faults.popleft()(exchange)
            return self._list(path.removeprefix("/object/list/"), request)
        if request.method == "DELETE" and path.startswith("/object/") and "/" not in path.removeprefix("/object/"):
            if self.delete_faults:
                return await self.delete_faults.popleft()(exchange)
            return self._delete(path.removeprefix("/object/"), request)
        if request.method == "GET" and path.startswith("/object/"):
            where = self._split(path.removeprefix("/object/"))
            if where is None:
                return storage_error("404", "Bucket not found", "Bucket not found", "NoSuchBucket")
            return self._object(where)
        if request.method == "POST" and path.startswith("/object/"):
            if self.upload_faults:
                return await self.upload_faults.popleft()(exchange)
            return self._upload(path.removeprefix("/object/"), request)
        return storage_error("404", "not_found", f"no route {request.method} {request.path}", "NotFound")

    def _authorized(self, request: RecordedRequest) -> bool:
        return (
            request.headers.get("authorization") == f"Bearer {self.service_key}"
            and request.headers.get("apikey") == self.service_key
        )

    def _bucket(self, bucket_id: str) -> Reply:
        if bucket_id not in self.buckets:
            return storage_error("404", "Bucket not found", "Bucket not found", "NoSuchBucket")
        made = "2026-11-01T10:00:00.000Z"
        return Reply.json(
            {
                "id": bucket_id,
                "name": bucket_id,
                "owner": "",
                "public": self.buckets[bucket_id],
                "file_size_limit": None,
                "allowed_mime_types": None,
                "created_at": made,
                "updated_at": made,
                "type": "STANDARD",
            }
        )

    def _split(self, rest: str) -> tuple[str, str] | None:
        bucket, _, key = rest.partition("/")
        return (bucket, key) if bucket in self.buckets and key else None

    def _upload(self, rest: str, request: RecordedRequest) -> Reply:
        where = self._split(rest)
        if where is None:
            return storage_error("404", "Bucket not found", "Bucket not found", "NoSuchBucket")
        upsert = request.headers.get("x-upsert") == "true" and not self.ignore_upsert
        if where in self.objects and not upsert:
            return storage_error("409", "Duplicate", "The resource already exists", "KeyAlreadyExists")
        self.objects[where] = _file_part(request)
        return Reply.json({"Key": f"{where[0]}/{where[1]}", "Id": secrets.token_hex(8)})

    def _list(self, bucket: str, request: RecordedRequest) -> Reply:
        if bucket not in self.buckets:
            return storage_error("404", "Bucket not found", "Bucket not found", "NoSuchBucket")
        body = request.json()
        folder = str(body.get("prefix", "")).strip("/")
        inside = f"{folder}/" if folder else ""
        entries: dict[str, dict[str, object]] = {}
        for (in_bucket, key), stored in self.objects.items():
            if in_bucket != bucket or not key.startswith(inside):
                continue
            name, _, deeper = key[len(inside) :].partition("/")
            if deeper:
                entries.setdefault(name, {"name": name, "id": None, "metadata": None})
            else:
                entries[name] = {
                    "name": name,
                    "id": f"id-{abs(hash((bucket, key))):x}",
                    "metadata": {"size": len(stored.data), "mimetype": stored.content_type},
                }
        names = sorted(entries)
        offset, limit = int(body.get("offset", 0)), int(body.get("limit", 100))
        return Reply.json([entries[name] for name in names[offset : offset + limit]])

    def _delete(self, bucket: str, request: RecordedRequest) -> Reply:
        if bucket not in self.buckets:
            return storage_error("404", "Bucket not found", "Bucket not found", "NoSuchBucket")
        deleted = []
        for key in request.json().get("prefixes", []):
            if self.objects.pop((bucket, key), None) is not None:
                deleted.append({"bucket_id": bucket, "name": key})
        return Reply.json(deleted)

    def _sign(self, rest: str, request: RecordedRequest) -> Reply:
        where = self._split(rest)
        if where is None or where not in self.objects:
            return storage_error("404", "not_found", "Object not found", "NoSuchKey")
        self.sign_requests.append(request.json())
        token = secrets.token_urlsafe(16)
        self.tokens[token] = where
        return Reply.json({"signedURL": f"/object/sign/{where[0]}/{where[1]}?token={token}"})

    def _read_public(self, rest: str) -> Reply:
        where = self._split(rest)
        if where is None or not self.buckets[where[0]]:
            return storage_error("404", "Bucket not found", "Bucket not found", "NoSuchBucket")
        return self._object(where)

    def _read_signed(self, rest: str, request: RecordedRequest) -> Reply:
        where = self._split(rest)
        token = (request.query.get("token") or [""])[0]
        if where is None or self.tokens.get(token) != where:
            return storage_error("400", "InvalidSignature", "The signature is invalid", "InvalidSignature")
        return self._object(where)

    def _object(self, where: tuple[str, str]) -> Reply:
        stored = self.objects.get(where)
        if stored is None:
            return storage_error("404", "not_found", "Object not found", "NoSuchKey")
        return Reply(200, stored.data, {"content-type": stored.content_type})
