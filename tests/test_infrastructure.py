"""The fixtures really are a Redis server and an S3 server."""

from redis.asyncio import Redis

from shared.storage import Storage


async def test_redis_is_a_real_server(redis: Redis) -> None:
    info = await redis.info("server")
    assert int(str(info["redis_version"]).split(".")[0]) >= 7
    await redis.xadd("t:stream", {"a": "1"})
    assert await redis.xlen("t:stream") >= 1


async def test_storage_round_trip_and_presigned_links(storage: Storage) -> None:
    import aiohttp

    await storage.put_bytes("t/object", b"payload", "text/plain")
    assert await storage.exists("t/object")
    assert not await storage.exists("t/missing")
    async with aiohttp.ClientSession() as session:
        async with session.get(storage.presigned_get("t/object")) as response:
            assert response.status == 200
            assert await response.read() == b"payload"
        put_url = storage.presigned_put("t/put")
        async with session.put(put_url, data=b"up", headers={"Content-Type": "image/png"}) as response:
            assert response.status == 200
    assert await storage.get_bytes("t/put") == b"up"
