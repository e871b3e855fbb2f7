"""``offload-rt serve``: an OpenAI-compatible HTTP server for one loaded model.

Modules, from the wire inward (only ``app``, ``http_io`` and ``serve`` import starlette or
uvicorn, which ``pip install 'offload_rt[serve]'`` installs; nothing here imports them at
package import):

* ``serve``: uvicorn on a loopback address by default; SIGINT/SIGTERM drain the queue.
* ``app``: the Starlette routes (``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/models``, ``/health``, ``/metrics``); ``http_io``: body limit, API key, JSON replies.
* ``streaming``: server-sent events and the non-streaming reply, built from a job's events.
* ``requests`` / ``request_fields`` / ``messages``: request bodies checked field by field
  into a ``GenerationRequest``; a field that would change the answer and is not implemented
  is refused by name, never ignored.
* ``prepare``: the prompt encoded and the context checked before a request queues.
* ``jobs``: the bounded first-come-first-served queue and the one worker thread that runs
  generations (the runtime is synchronous and runs one generation at a time).
* ``responses``, ``errors``, ``metrics``: OpenAI-shaped objects, errors and the counters.
"""
