FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY migrations ./migrations
RUN pip install --no-cache-dir -e .
EXPOSE 8008
CMD ["python", "-m", "server", "serve"]
