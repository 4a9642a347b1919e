"""Where people label: a local labeling page (`alssl label-ui`) and a Label Studio round trip (`alssl tasks`).

- `session.py`: the open query as a labeling session: partial labels saved at once to
  `RUN/queries/round-K.partial.csv`, submit through the same validation as `alssl label --from`, the next query.
- `server.py`: the token-guarded Starlette app (127.0.0.1 by default) and its JSON API; `static/` holds the page
  (plain HTML/JS/CSS, no build step, nothing fetched from elsewhere).
- `studio.py`: Label Studio tasks + labeling config out, Label Studio exports (JSON, JSON-MIN, CSV) back in.
"""
