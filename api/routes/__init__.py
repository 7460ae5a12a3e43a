"""One APIRouter per resource: jobs, models, health (and metrics)."""
