"""Where people label: a local labeling page (`alssl label-ui`) and a Label Studio round trip (`alssl tasks`).

- `session.py`: the open query as a labeling session: partial labels saved at once to
  `RUN/queries/round-K.partial.csv`, submit through `rounds.close_round`, as `alssl label --from`, the next query.
- `server.py`: the token-guarded Starlette app (127.0.0.1 by default) and its JSON API; `static/` holds the page
  (plain HTML/JS/CSS, no build step, nothing fetched from elsewhere).
- `studio.py`: Label Studio tasks + labeling config out.
- `files.py`: label files in (our label CSV; Label Studio exports: JSON, JSON-MIN, CSV) and Python mappings, as rows
  for `rounds.close_round`, the one import every way of labeling goes through.
- `images.py`: every image alssl encodes for people (pool pixels as PNG, downscaled originals, contact sheets).
"""
