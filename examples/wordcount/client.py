"""A client of the protocol, written from the HTTP contract alone: submit, poll, read.

python -m examples.wordcount.client http://127.0.0.1:8000
"""

import sys
import time

import httpx

TEXT = b"Long-running work does not belong in a request: submit it, then poll for the result."


def main(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        response = client.post("/words", files={"text": ("text.txt", TEXT)})
        print(f"POST /words -> {response.status_code}, Location: {response.headers['location']}")
        assert response.status_code == 303
        location = response.headers["location"]
        while True:
            response = client.get(location)
            print(f"GET {location} -> {response.status_code} {response.text}")
            if response.status_code != 202:
                break
            time.sleep(min(float(response.headers.get("retry-after", "1")), 0.2))
        assert response.status_code == 200, response.text
        assert response.json() == {"count": len(TEXT.split())}
        print(f"DELETE {location} -> {client.delete(location).status_code}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")
