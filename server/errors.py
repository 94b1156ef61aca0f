"""The API's error codes (SPEC §1) and the exception that carries one to the envelope."""

# (result_code, result_subcode)
ENDPOINT_NOT_SUPPORTED = (400, 1)
MISSING_FIELDS = (400, 11)
VALIDATION_ERROR = (400, 12)
INVALID_FIELD_VALUES = (400, 16)
INVALID_WORKER_ID = (400, 1001)
REGISTRATION_FAILED = (400, 1002)
WORKER_NOT_REGISTERED = (400, 1004)
WORKER_STATS_NOT_FOUND = (400, 1005)
MISSING_CREDENTIALS = (401, 20)
MALFORMED_CREDENTIALS = (401, 21)
INVALID_CREDENTIALS = (401, 22)
INVALID_TOKEN = (401, 30)
METHOD_NOT_ALLOWED = (405, 0)
BODY_TOO_LARGE = (413, 0)
# A company's limits (server/limits.py): retry after the answer's Retry-After.
TOO_MANY_REPORTS = (429, 0)  # reports per second
TOO_MANY_WORKERS = (429, 1)  # live registered workers
TOO_MANY_METRIC_KEYS = (429, 2)  # distinct metric keys
# Heavy reads waiting for their turn (server/admission.py): retry after the Retry-After.
TOO_MANY_READS = (429, 3)  # this company's reads waiting in this process
DATABASE_UNAVAILABLE = (503, 0)
READS_BUSY = (503, 1)  # a read waited longer than WORKERS_READ_QUEUE_SECONDS
INTERNAL_ERROR = (500, 0)


class ApiError(Exception):
    def __init__(
        self,
        code: tuple[int, int],
        message: str,
        *,
        retry_after: int | None = None,
        allow: frozenset[str] = frozenset(),
    ):
        super().__init__(message)
        self.result_code, self.result_subcode = code
        self.message = message
        self.retry_after = retry_after  # seconds: the answer's Retry-After header
        self.allow = allow  # the methods of the answer's Allow header (a 405's)
