"""One APIRouter per concern; each route only decodes the request, calls the engine, encodes the answer."""
