"""End images in a purge: the request names them, the store hands them back with the first images."""

from __future__ import annotations

from bot.db.store import JobStore, NewJob


async def test_purge_returns_end_images_except_those_another_user_still_uses(store: JobStore) -> None:
    def job(user: str, image: str, end: str | None) -> NewJob:
        return NewJob(user_id=user, prompt="p", params={"prompt": "p", "end_image": end}, input_path=f"/up/{image}",
                      input_sha256="1" * 64)

    await store.create(job("bob", "b.png", "shared-end.png"))
    await store.create(job("alice", "a.png", "own-end.png"))
    await store.create(job("alice", "a2.png", "shared-end.png"))
    await store.create(job("alice", "a3.png", None))
    result = await store.purge_user("alice")
    # Bob's job still ends on shared-end.png: it stays.
    assert result.images == ["/up/a.png", "/up/a2.png", "/up/a3.png", "/up/own-end.png"]
