"""promptmill: distributed batch text-to-image on Ray.

The one import name. Its three packages keep their folders at the repository's top level (`pipelines/`,
`models/`, `jobs/`); pyproject.toml maps them to `promptmill.pipelines`, `promptmill.models` and
`promptmill.jobs`, so an install never puts `models` or `jobs` into site-packages.
"""

__version__ = "0.1.0"
