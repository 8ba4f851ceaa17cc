"""The error of a request that the OpenAI-shaped entry points refuse, raised from any layer that
checks a part of one (`openai_format`, `tools`)."""


class InvalidRequest(ValueError):
    """A request OpenAI's API refuses as an `invalid_request_error`; `param` names what is wrong."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
