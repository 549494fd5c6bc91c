"""Framework fit: FastAPI/Starlette lifespan (``poolkit.integrations.fastapi``) and Django DATABASES (``.django``)."""
