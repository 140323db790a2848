"""The seed article's word count, served by FastAPI, Starlette and Litestar with one worker."""
