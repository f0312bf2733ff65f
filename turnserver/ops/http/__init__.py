"""The HTTP services (aiohttp), one app factory each, served by `serve`: the credentials
API (`credentials_api`, Twilio's Tokens and the TURN REST API; `credentials` mints), the
admin API (`admin_api` over an `admin_backend`: this process, the workers of a
supervisor or the whole fleet; `revocations` persist in a file) and the health and
metrics endpoints (`health`)."""
