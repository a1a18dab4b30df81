"""The HTTP layer: request helpers, auth dependencies and the routes of each area. It only translates
requests into calls on the services (server/services.py) and their answers into responses."""
