// The KeyStore contract (hsm/key_store.h), run on every real backend of
// testing::key_store_backends(): signing and rotation, data-key wrapping, keyed pseudonyms, the
// rollback counter and random bytes, each also across a close and reopen. Backend specifics
// (object attributes, reconnects, messages) are tested in that backend's own test file.
#include <catch2/catch.hpp>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "hsm/bytes.h"
#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"
#include "hsm/public_key.h"
#include "hsm/sealed_box.h"
#include "tests/support/key_stores.h"
#include "tests/support/temp_dir.h"

namespace medgate {
namespace {

using hsm::KeyPolicy;
using testing::TempDir;
using testing::TestKeyStore;

Hash digest_of(const std::string& text) {
  return sha256(as_bytes(text));
}

Bytes pattern(std::size_t n, unsigned seed) {
  Bytes b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<std::byte>((i * 31 + seed) & 0xff);
  return b;
}

std::vector<KeyId> ids_of(const std::vector<PublicKey>& keys) {
  std::vector<KeyId> ids;
  for (const PublicKey& key : keys) ids.push_back(key.id());
  return ids;
}

}  // namespace

TEST_CASE("key store contract", "[key_store]") {
  const std::string backend = GENERATE(from_range(testing::key_store_backends()));
  INFO("backend: " << backend);
  TempDir dir;
  TestKeyStore device(backend, dir.path());
  std::unique_ptr<hsm::KeyStore> store = device.open(KeyPolicy::kCreateIfMissing);

  SECTION("signatures verify under the active key, and only over their digest") {
    const Hash digest = digest_of("head 1");
    Result<Bytes> signature = store->sign_digest(digest);
    INFO(signature.status().to_string());
    REQUIRE(signature.ok());
    CHECK(store->signing_key().verify_digest(digest, *signature).ok());
    Hash flipped = digest;
    flipped[31] ^= std::byte{0x80};
    CHECK(store->signing_key().verify_digest(flipped, *signature).code() ==
          StatusCode::kVerificationFailed);
    CHECK(store->signing_keys() == std::vector<PublicKey>{store->signing_key()});
    Result<Bytes> with = store->sign_digest_with(store->signing_key().id(), digest);
    REQUIRE(with.ok());
    CHECK(store->signing_key().verify_digest(digest, *with).ok());
  }

  SECTION("rotation: a new key, both usable, oldest first, kept across reopen") {
    const PublicKey first = store->signing_key();
    Result<PublicKey> second = store->create_signing_key();
    INFO(second.status().to_string());
    REQUIRE(second.ok());
    CHECK(second->id() != first.id());
    CHECK(store->signing_key() == first);  // not active until use_signing_key
    CHECK(ids_of(store->signing_keys()) == std::vector<KeyId>{first.id(), second->id()});

    REQUIRE(store->use_signing_key(second->id()).ok());
    CHECK(store->signing_key() == *second);
    const Hash digest = digest_of("transition");
    Result<Bytes> by_active = store->sign_digest(digest);
    REQUIRE(by_active.ok());
    CHECK(second->verify_digest(digest, *by_active).ok());
    CHECK(first.verify_digest(digest, *by_active).code() == StatusCode::kVerificationFailed);
    Result<Bytes> by_old = store->sign_digest_with(first.id(), digest);
    REQUIRE(by_old.ok());
    CHECK(first.verify_digest(digest, *by_old).ok());
    Result<Bytes> by_new = store->sign_digest_with(second->id(), digest);
    REQUIRE(by_new.ok());
    CHECK(second->verify_digest(digest, *by_new).ok());

    Result<PublicKey> third = store->create_signing_key();
    REQUIRE(third.ok());
    CHECK(store->signing_key() == *second);
    const std::vector<KeyId> order = {first.id(), second->id(), third->id()};
    CHECK(ids_of(store->signing_keys()) == order);

    KeyId unknown = first.id();
    unknown[0] ^= std::byte{0x01};
    CHECK(store->use_signing_key(unknown).code() == StatusCode::kNotFound);
    CHECK(store->sign_digest_with(unknown, digest).status().code() == StatusCode::kNotFound);
    CHECK(store->signing_key() == *second);

    store.reset();
    store = device.open(KeyPolicy::kUseExisting);
    CHECK(ids_of(store->signing_keys()) == order);
    REQUIRE(store->use_signing_key(third->id()).ok());
    Result<Bytes> after = store->sign_digest(digest);
    REQUIRE(after.ok());
    CHECK(third->verify_digest(digest, *after).ok());
    by_old = store->sign_digest_with(first.id(), digest);
    REQUIRE(by_old.ok());
    CHECK(first.verify_digest(digest, *by_old).ok());
  }

  SECTION("data keys: wrap and unwrap, bound to their context") {
    const Bytes context = to_bytes("patient:42/data-key:1");
    for (std::size_t size : {std::size_t{1}, std::size_t{16}, std::size_t{32}, std::size_t{64}}) {
      INFO("key size " << size);
      const Bytes key = pattern(size, static_cast<unsigned>(size));
      Result<Bytes> wrapped = store->wrap_key(key, context);
      INFO(wrapped.status().to_string());
      REQUIRE(wrapped.ok());
      if (size > 1) {  // the key does not appear in clear
        CHECK(std::search(wrapped->begin(), wrapped->end(), key.begin(), key.end()) ==
              wrapped->end());
      }
      Result<hsm::SecretBytes> unwrapped = store->unwrap_key(*wrapped, context);
      INFO(unwrapped.status().to_string());
      REQUIRE(unwrapped.ok());
      CHECK(Bytes(unwrapped->view().begin(), unwrapped->view().end()) == key);
    }

    const Bytes key = pattern(32, 7);
    Result<Bytes> wrapped = store->wrap_key(key, context);
    REQUIRE(wrapped.ok());
    Result<Bytes> again = store->wrap_key(key, context);
    REQUIRE(again.ok());
    CHECK(*again != *wrapped);  // a fresh IV every time

    SECTION("another context does not unwrap") {
      CHECK(store->unwrap_key(*wrapped, to_bytes("patient:43/data-key:1")).status().code() ==
            StatusCode::kVerificationFailed);
      CHECK(store->unwrap_key(*wrapped, {}).status().code() == StatusCode::kVerificationFailed);
    }
    SECTION("any altered byte after the format byte is caught") {
      for (std::size_t i = 1; i < wrapped->size(); ++i) {
        Bytes altered = *wrapped;
        altered[i] ^= std::byte{0x01};
        INFO("byte " << i);
        CHECK(store->unwrap_key(altered, context).status().code() ==
              StatusCode::kVerificationFailed);
      }
    }
    SECTION("a blob too short to be one is malformed") {
      for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{10}}) {
        INFO("length " << n);
        Result<hsm::SecretBytes> result = store->unwrap_key(ByteView(*wrapped).first(n), context);
        CHECK(result.status().code() == StatusCode::kInvalidArgument);
      }
    }
    SECTION("keys longer than 64 bytes or empty are refused") {
      CHECK(store->wrap_key(pattern(65, 1), context).status().code() ==
            StatusCode::kInvalidArgument);
      CHECK(store->wrap_key({}, context).status().code() == StatusCode::kInvalidArgument);
    }
    SECTION("the KEK is the same after reopening") {
      store.reset();
      store = device.open(KeyPolicy::kUseExisting);
      Result<hsm::SecretBytes> unwrapped = store->unwrap_key(*wrapped, context);
      INFO(unwrapped.status().to_string());
      REQUIRE(unwrapped.ok());
      CHECK(Bytes(unwrapped->view().begin(), unwrapped->view().end()) == key);
    }
  }

  SECTION("keyed pseudonyms are deterministic, distinct and keyed") {
    Result<Hash> a = store->keyed_hash(as_bytes("MRN 0001234"));
    Result<Hash> b = store->keyed_hash(as_bytes("MRN 0001234"));
    Result<Hash> c = store->keyed_hash(as_bytes("MRN 0001235"));
    Result<Hash> empty = store->keyed_hash({});
    INFO(a.status().to_string());
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    REQUIRE(c.ok());
    REQUIRE(empty.ok());
    CHECK(*a == *b);
    CHECK(*a != *c);
    CHECK(*a != sha256(as_bytes("MRN 0001234")));  // not a plain hash anyone could recompute
    std::set<Hash> distinct;
    for (int i = 0; i < 100; ++i)
      distinct.insert(store->keyed_hash(as_bytes(std::to_string(i))).value());
    CHECK(distinct.size() == 100);

    store.reset();
    store = device.open(KeyPolicy::kUseExisting);
    Result<Hash> reopened = store->keyed_hash(as_bytes("MRN 0001234"));
    REQUIRE(reopened.ok());
    CHECK(*reopened == *a);
  }

  SECTION("a key-agreement key opens boxes sealed to it, and only those") {
    Result<PublicKey> agreement = store->agreement_key();
    INFO(agreement.status().to_string());
    REQUIRE(agreement.ok());
    CHECK(agreement->id() != store->signing_key().id());
    CHECK(store->agreement_key().value() == *agreement);  // found again, not a second key

    const Bytes secret = pattern(32, 7);
    Result<Bytes> box = hsm::seal_to(*agreement, secret, "cluster secret");
    REQUIRE(box.ok());
    CHECK(hsm::sealed_box_recipient(*box).value() == agreement->id());
    Result<hsm::SecretBytes> opened = hsm::open_sealed_box(*store, *box, "cluster secret");
    INFO(opened.status().to_string());
    REQUIRE(opened.ok());
    CHECK(Bytes(opened->view().begin(), opened->view().end()) == secret);

    CHECK(hsm::open_sealed_box(*store, *box, "another purpose").status().code() ==
          StatusCode::kVerificationFailed);
    Bytes altered = *box;
    altered.back() ^= std::byte{0x01};
    CHECK(hsm::open_sealed_box(*store, altered, "cluster secret").status().code() ==
          StatusCode::kVerificationFailed);
    Bytes truncated(box->begin(), box->begin() + 100);
    CHECK(hsm::open_sealed_box(*store, truncated, "cluster secret").status().code() ==
          StatusCode::kCorruption);
    // Sealed to another key (the signing key's public half stands in for a stranger's).
    Result<Bytes> stranger = hsm::seal_to(store->signing_key(), secret, "cluster secret");
    REQUIRE(stranger.ok());
    CHECK(hsm::open_sealed_box(*store, *stranger, "cluster secret").status().code() ==
          StatusCode::kNotFound);

    store.reset();
    store = device.open(KeyPolicy::kUseExisting);
    CHECK(store->agreement_key().value() == *agreement);
    Result<hsm::SecretBytes> reopened = hsm::open_sealed_box(*store, *box, "cluster secret");
    REQUIRE(reopened.ok());
    CHECK(Bytes(reopened->view().begin(), reopened->view().end()) == secret);
  }

  SECTION("the counter starts at 1, counts up by one and survives reopening") {
    Result<std::uint64_t> start = store->read_counter();
    INFO(start.status().to_string());
    REQUIRE(start.ok());
    CHECK(*start == 1);
    CHECK(store->increment_counter().value() == 2);
    CHECK(store->read_counter().value() == 2);
    CHECK(store->increment_counter().value() == 3);

    store.reset();
    store = device.open(KeyPolicy::kUseExisting);
    CHECK(store->read_counter().value() == 3);
    CHECK(store->increment_counter().value() == 4);
    // kCreateIfMissing does not reset what exists.
    store.reset();
    store = device.open(KeyPolicy::kCreateIfMissing);
    CHECK(store->read_counter().value() == 4);
  }

  SECTION("random bytes of the length asked for") {
    for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{32}, std::size_t{1000}}) {
      Result<Bytes> bytes = store->random(n);
      REQUIRE(bytes.ok());
      CHECK(bytes->size() == n);
    }
    CHECK(store->random(32).value() != store->random(32).value());
  }

  SECTION("reopening with kUseExisting finds everything kCreateIfMissing made") {
    const PublicKey key = store->signing_key();
    store.reset();
    Result<std::unique_ptr<hsm::KeyStore>> reopened = device.try_open(KeyPolicy::kUseExisting);
    INFO(reopened.status().to_string());
    REQUIRE(reopened.ok());
    CHECK((*reopened)->signing_key() == key);
    hsm::KeyStoreHealth health = (*reopened)->health();
    CHECK(health.reachable);
    CHECK(health.errors == 0);
    CHECK(health.reconnects == 0);
    CHECK_FALSE((*reopened)->description().empty());
  }
}

}  // namespace medgate
