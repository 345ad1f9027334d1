#include "appliance/vault.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <initializer_list>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include <fmt/format.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "appliance/log.h"
#include "hsm/aead.h"
#include "ledger/entry.h"
#include "ledger/sqlite.h"

namespace medgate::appliance {
namespace {

namespace sql = ledger::sql;

// 'MGVT' in the SQLite header's application_id: tells a vault from a ledger or any other file.
constexpr std::int64_t kApplicationId = 0x4d475654;

// Domain separation: each use of a key or of the pseudonym key gets its own label, so bytes made
// for one purpose can never be accepted for another. Labels end in NUL so no label is a prefix of
// another label followed by data.
constexpr std::string_view kPseudonymLabel{"medgate patient v1\0", 19};
constexpr std::string_view kDataKeyContext = "medgate data-key v1";
constexpr std::string_view kPayloadLabel{"medgate payload v1\0", 19};
constexpr std::string_view kIdentifierLabel{"medgate identifier v1\0", 22};
constexpr std::string_view kClusterSecretContext = "medgate cluster secret v1";
constexpr std::string_view kClusterSecretIdLabel{"medgate cluster secret id v1\0", 29};
constexpr std::string_view kClusterPseudonymInfo = "medgate cluster pseudonym v1";
constexpr std::string_view kClusterDataKeysInfo = "medgate cluster data keys v1";
constexpr std::string_view kMemberKeyLabel{"medgate member data key v1\0", 27};
constexpr std::byte kFormatWithKeyId{0x02};

constexpr std::byte kFormatVersion{0x01};
constexpr std::size_t kKeySize = 32;
constexpr std::size_t kIvSize = 12;
constexpr std::size_t kTagSize = 16;
// OpenSSL's EVP calls take int lengths; observations are far smaller than this.
constexpr std::size_t kMaxSealed = std::size_t{1} << 30;
constexpr std::size_t kCachedPseudonyms = 4096;
constexpr std::size_t kCachedKeys = 1024;

// kMigrations[i] takes the schema from version i to i + 1. Append only.
constexpr const char* kMigrations[] = {
    // 0 -> 1: the first schema. state: 0 active, 1 erase pending, 2 erased. wrapped_key and
    // identifier are NULL once erased; erase_* describe the request (erase_ledger_size: the
    // ledger's size when it was made, where a resumed erasure looks for its entry).
    R"sql(
      CREATE TABLE patients (
        pseudonym BLOB PRIMARY KEY NOT NULL,
        state INTEGER NOT NULL,
        created_us INTEGER NOT NULL,
        wrapped_key BLOB,
        identifier BLOB,
        erase_requested_us INTEGER,
        erase_actor TEXT,
        erase_reason TEXT,
        erase_ledger_size INTEGER,
        erasure_entry INTEGER,
        erased_us INTEGER
      ) WITHOUT ROWID;
      CREATE INDEX patients_pending ON patients (state) WHERE state = 1;
    )sql",
    // 1 -> 2: a replicated ledger's shared secret, wrapped by the key store's KEK (one row).
    R"sql(
      CREATE TABLE cluster_secret (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        secret_id BLOB NOT NULL,
        wrapped BLOB NOT NULL,
        adopted_us INTEGER NOT NULL
      );
    )sql",
    // 2 -> 3: data keys shared between a cluster's members. A patient's own key gets an id once
    // the vault holds a cluster secret (its ciphertexts then carry the id) and is published to the
    // other members (published = 0 until it is); other members' keys for the same patient are
    // kept wrapped by this key store's KEK in member_keys.
    R"sql(
      ALTER TABLE patients ADD COLUMN key_id BLOB;
      ALTER TABLE patients ADD COLUMN published INTEGER NOT NULL DEFAULT 1;
      CREATE INDEX patients_unpublished ON patients (published) WHERE published = 0;
      CREATE TABLE member_keys (
        pseudonym BLOB NOT NULL,
        key_id BLOB NOT NULL,
        wrapped BLOB NOT NULL,
        received_us INTEGER NOT NULL,
        PRIMARY KEY (pseudonym, key_id)
      ) WITHOUT ROWID;
    )sql",
};
constexpr int kSchemaVersion = static_cast<int>(std::size(kMigrations));

enum class StoredState : std::int64_t { kActive = 0, kErasePending = 1, kErased = 2 };

// An exclusive flock on `<vault>.lock`, so a second process cannot open the same vault (its key
// cache would not see the other's erasures).
class VaultLock {
 public:
  static Result<VaultLock> acquire(const std::filesystem::path& vault_path) {
    std::filesystem::path path = vault_path;
    path += ".lock";
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
      return Status::IOError(
          fmt::format("cannot open lock {}: {}", path.string(), std::strerror(errno)));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd);
      return Status::FailedPrecondition(
          fmt::format("vault {} is in use by another process", vault_path.string()));
    }
    return VaultLock(fd);
  }
  VaultLock(VaultLock&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  VaultLock& operator=(VaultLock&&) = delete;
  ~VaultLock() {
    if (fd_ >= 0) ::close(fd_);
  }

 private:
  explicit VaultLock(int fd) : fd_(fd) {}
  int fd_;
};

Result<std::int64_t> pragma_int(sql::Database& db, std::string_view pragma) {
  MEDGATE_ASSIGN_OR_RETURN(sql::Statement st, db.prepare(fmt::format("PRAGMA {}", pragma)));
  MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
  if (step != sql::Statement::Step::kRow)
    return Status::Corruption(fmt::format("PRAGMA {} gave no row", pragma));
  return st.column_int(0);
}

// A new (empty) file, or one this code made: anything else is refused before it is written to.
Status check_is_vault(sql::Database& db, const std::filesystem::path& path) {
  auto refuse = [&](std::string why) {
    return Status::Corruption(
        fmt::format("{} is not a medgate vault ({}); refusing to use it", path.string(), why));
  };
  Result<std::int64_t> app = pragma_int(db, "application_id");
  if (!app.ok()) return refuse(app.status().message());
  if (*app == kApplicationId) return Status::Ok();
  if (*app != 0) return refuse(fmt::format("application id {:#x}", *app));
  Result<std::int64_t> version = pragma_int(db, "user_version");
  Result<sql::Statement> tables = db.prepare("SELECT count(*) FROM sqlite_schema");
  if (!version.ok()) return refuse(version.status().message());
  if (!tables.ok()) return refuse(tables.status().message());
  Result<sql::Statement::Step> step = tables->step();
  if (!step.ok()) return refuse(step.status().message());
  if (*version != 0 || tables->column_int(0) != 0) return refuse("it holds other tables");
  return Status::Ok();
}

Status migrate(sql::Database& db) {
  MEDGATE_ASSIGN_OR_RETURN(std::int64_t version, pragma_int(db, "user_version"));
  if (version > kSchemaVersion)
    return Status::FailedPrecondition(
        fmt::format("vault schema version {} is newer than this build understands ({})", version,
                    kSchemaVersion));
  for (auto v = static_cast<int>(version); v < kSchemaVersion; ++v) {
    MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db));
    Status s = db.exec(kMigrations[v]);
    if (s.ok())
      s = db.exec(fmt::format("PRAGMA user_version = {}; PRAGMA application_id = {}", v + 1,
                              kApplicationId));
    if (s.ok()) s = tx.commit();
    if (!s.ok())
      return s.with_context(
          fmt::format("vault schema migration {} -> {} failed; the file is unchanged", v, v + 1));
  }
  return Status::Ok();
}

// Copies the WAL into the database and truncates it to zero bytes, so pages that held a wrapped key
// before an erasure do not stay in the WAL.
Status truncate_wal(sql::Database& db) {
  int wal_frames = 0, checkpointed = 0;
  int rc = sqlite3_wal_checkpoint_v2(db.handle(), nullptr, SQLITE_CHECKPOINT_TRUNCATE, &wal_frames,
                                     &checkpointed);
  if (rc != SQLITE_OK) return db.error("checkpoint the vault's WAL");
  if (wal_frames != 0)
    return Status::IOError(
        fmt::format("the vault's WAL still holds {} frames after a checkpoint", wal_frames));
  return Status::Ok();
}

Bytes concat(std::initializer_list<ByteView> parts) {
  Bytes out;
  for (ByteView p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

Bytes data_key_context(const Pseudonym& p) {
  return concat({as_bytes(kDataKeyContext), p.bytes});
}

struct CipherCtx {
  CipherCtx() : ctx(EVP_CIPHER_CTX_new()) {}
  ~CipherCtx() { EVP_CIPHER_CTX_free(ctx); }
  CipherCtx(const CipherCtx&) = delete;
  CipherCtx& operator=(const CipherCtx&) = delete;
  EVP_CIPHER_CTX* ctx;
};

// AES-256-GCM: 0x01 || iv || ciphertext || tag, with label || pseudonym || aad authenticated. The
// IV comes from OpenSSL's CSPRNG (not the key store: no device call per message); random 96-bit IVs
// are safe far beyond the number of messages one patient's key will ever see.
Result<Bytes> seal(ByteView key, std::string_view label, const Pseudonym& p, ByteView aad,
                   ByteView plaintext) {
  if (plaintext.size() > kMaxSealed || aad.size() > kMaxSealed)
    return Status::InvalidArgument(
        fmt::format("a payload or its associated data is larger than {} bytes", kMaxSealed));
  Bytes out(1 + kIvSize + plaintext.size() + kTagSize);
  out[0] = kFormatVersion;
  std::span<std::byte> iv(out.data() + 1, kIvSize);
  if (RAND_bytes(u8(iv), static_cast<int>(kIvSize)) != 1)
    return Status::Internal("OpenSSL's random generator failed");
  Bytes full_aad = concat({as_bytes(label), p.bytes, aad});
  CipherCtx c;
  int n = 0, m = 0;
  std::span<std::byte> ct(out.data() + 1 + kIvSize, plaintext.size());
  if (!c.ctx || EVP_EncryptInit_ex(c.ctx, EVP_aes_256_gcm(), nullptr, u8(key), u8(iv)) != 1 ||
      EVP_EncryptUpdate(c.ctx, nullptr, &n, u8(ByteView(full_aad)),
                        static_cast<int>(full_aad.size())) != 1 ||
      EVP_EncryptUpdate(c.ctx, u8(ct), &n, u8(plaintext), static_cast<int>(plaintext.size())) !=
          1 ||
      EVP_EncryptFinal_ex(c.ctx, u8(ct) + n, &m) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.ctx, EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagSize),
                          out.data() + 1 + kIvSize + plaintext.size()) != 1)
    return Status::Internal("AES-256-GCM encryption failed in OpenSSL");
  return out;
}

Result<Bytes> open_sealed(ByteView key, std::string_view label, const Pseudonym& p, ByteView aad,
                          ByteView sealed) {
  if (sealed.size() > kMaxSealed + 1 + kIvSize + kTagSize || aad.size() > kMaxSealed)
    return Status::InvalidArgument(
        fmt::format("a ciphertext or its associated data is larger than {} bytes", kMaxSealed));
  if (sealed.size() < 1 + kIvSize + kTagSize)
    return Status::VerificationFailed(
        fmt::format("ciphertext of {} bytes is shorter than the {} of an empty one", sealed.size(),
                    1 + kIvSize + kTagSize));
  if (sealed[0] != kFormatVersion)
    return Status::VerificationFailed(fmt::format("ciphertext has an unknown format byte {:#04x}",
                                                  std::to_integer<unsigned>(sealed[0])));
  ByteView iv = sealed.subspan(1, kIvSize);
  ByteView ct = sealed.subspan(1 + kIvSize, sealed.size() - 1 - kIvSize - kTagSize);
  Bytes tag(sealed.end() - kTagSize, sealed.end());
  Bytes full_aad = concat({as_bytes(label), p.bytes, aad});
  Bytes out(ct.size());
  CipherCtx c;
  int n = 0, m = 0;
  if (!c.ctx || EVP_DecryptInit_ex(c.ctx, EVP_aes_256_gcm(), nullptr, u8(key), u8(iv)) != 1 ||
      EVP_DecryptUpdate(c.ctx, nullptr, &n, u8(ByteView(full_aad)),
                        static_cast<int>(full_aad.size())) != 1 ||
      EVP_DecryptUpdate(c.ctx, u8(std::span<std::byte>(out)), &n, u8(ct),
                        static_cast<int>(ct.size())) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.ctx, EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagSize), tag.data()) != 1)
    return Status::Internal("AES-256-GCM decryption failed in OpenSSL");
  if (EVP_DecryptFinal_ex(c.ctx, u8(std::span<std::byte>(out)) + n, &m) != 1) {
    secure_wipe(out);  // unauthenticated plaintext must not leave this function
    return Status::VerificationFailed(
        "ciphertext does not authenticate: it was altered, or belongs to another patient or "
        "context");
  }
  return out;
}

std::optional<std::uint64_t> optional_uint(const sql::Statement& st, int column) {
  if (st.column_is_null(column)) return std::nullopt;
  return st.column_uint(column);
}

// A bounded map with least-recently-used eviction.
template <typename Key, typename Value>
class LruCache {
 public:
  explicit LruCache(std::size_t capacity) : capacity_(capacity) {}

  const Value* find(const Key& key) {
    auto it = index_.find(std::cref(key));
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second);
    return &it->second->second;
  }
  void put(Key key, Value value) {
    erase(key);
    order_.emplace_front(std::move(key), std::move(value));
    index_.emplace(std::cref(order_.front().first), order_.begin());
    if (order_.size() > capacity_) {
      index_.erase(order_.back().first);
      order_.pop_back();
    }
  }
  void erase(const Key& key) {
    auto it = index_.find(std::cref(key));
    if (it == index_.end()) return;
    order_.erase(it->second);
    index_.erase(it);
  }

 private:
  using Order = std::list<std::pair<Key, Value>>;
  using KeyRef = std::reference_wrapper<const Key>;
  struct KeyLess {
    bool operator()(KeyRef a, KeyRef b) const { return a.get() < b.get(); }
  };
  std::size_t capacity_;
  Order order_;  // most recently used first
  // Keys live once, in order_ (list nodes do not move), so an identifier is not copied around.
  std::map<KeyRef, typename Order::iterator, KeyLess> index_;
};

// Wipes an identifier when the pseudonym cache lets go of it.
struct CachedIdentifier {
  std::string id;
  explicit CachedIdentifier(std::string_view s) : id(s) {}
  // Copies and wipes rather than moves: a moved-from short string keeps its bytes in place.
  CachedIdentifier(CachedIdentifier&& o) noexcept : id(o.id) {
    secure_wipe(o.id);
    o.id.clear();
  }
  CachedIdentifier& operator=(CachedIdentifier&&) = delete;
  CachedIdentifier(const CachedIdentifier&) = delete;
  ~CachedIdentifier() { secure_wipe(id); }
  friend bool operator<(const CachedIdentifier& a, const CachedIdentifier& b) {
    return a.id < b.id;
  }
};

// The keys derived from a cluster secret: the one pseudonyms are made with, and the one that seals
// data keys for the other members.
Result<hsm::SecretBytes> derive_from_secret(ByteView secret, std::string_view info) {
  Bytes key(kKeySize);
  MEDGATE_RETURN_IF_ERROR(hsm::hkdf_sha256(secret, {}, as_bytes(info), key));
  return hsm::SecretBytes(std::move(key));
}

Bytes member_key_context(const Pseudonym& p, const DataKeyId& id) {
  return concat({data_key_context(p), id});
}

Bytes member_key_aad(const Pseudonym& p, const DataKeyId& id) {
  return concat({as_bytes(kMemberKeyLabel), p.bytes, id});
}

}  // namespace

Hash secret_id_of(ByteView secret) {
  return sha256(concat({as_bytes(kClusterSecretIdLabel), secret}));
}

std::string Pseudonym::prefix() const {
  return to_hex(ByteView(bytes).first(8));
}

std::optional<Pseudonym> Pseudonym::from_hex(std::string_view hex) {
  std::optional<Hash> h = hash_from_hex(hex);
  if (!h) return std::nullopt;
  return Pseudonym{*h};
}

std::string_view patient_state_name(PatientState state) {
  switch (state) {
    case PatientState::kActive:
      return "active";
    case PatientState::kErasePending:
      return "erase-pending";
    case PatientState::kErased:
      return "erased";
  }
  return "unknown";
}

class Vault::Impl {
 public:
  // A patient's own data key, with its id once the vault holds a cluster secret.
  struct OwnKey {
    std::shared_ptr<const hsm::SecretBytes> key;
    std::optional<DataKeyId> id;
  };

  Impl(VaultLock lock, sql::Database db, hsm::KeyStore& keys)
      : lock_(std::move(lock)), db_(std::move(db)), keys_(keys) {}

  Result<Pseudonym> pseudonym(std::string_view id, bool create) {
    if (id.empty()) return Status::InvalidArgument("the patient identifier is empty");
    {
      std::lock_guard lk(mu_);
      if (const Pseudonym* p = pseudonyms_.find(CachedIdentifier(id))) return *p;
    }
    std::shared_ptr<const hsm::SecretBytes> used;
    MEDGATE_ASSIGN_OR_RETURN(Hash mac, keyed_pseudonym(id, &used));
    std::unique_lock lk(mu_);
    // The cluster's secret adopted meanwhile (cluster init on a running box): name it anew.
    while (used != cluster_pseudonym_key_) {
      lk.unlock();
      MEDGATE_ASSIGN_OR_RETURN(mac, keyed_pseudonym(id, &used));
      lk.lock();
    }
    Pseudonym p{mac};
    MEDGATE_ASSIGN_OR_RETURN(std::optional<PatientInfo> info, read_info(p));
    if (!info) {
      if (!create) return Status::NotFound(fmt::format("no patient {} in the vault", p.prefix()));
      MEDGATE_RETURN_IF_ERROR(create_record(p, id));
    }
    pseudonyms_.put(CachedIdentifier(id), p);
    return p;
  }

  // The cluster's key once the vault holds its secret, else the key store's (outside mu_: the key
  // store serializes itself, and other patients need not wait).
  Result<Hash> keyed_pseudonym(std::string_view id, std::shared_ptr<const hsm::SecretBytes>* used) {
    const Bytes message = concat({as_bytes(kPseudonymLabel), as_bytes(id)});
    std::shared_ptr<const hsm::SecretBytes> cluster_key;
    {
      std::lock_guard lk(mu_);
      cluster_key = cluster_pseudonym_key_;
      *used = cluster_key;
      if (!cluster_key && cluster_required_)
        return Status::Unavailable(
            "this member has not received the cluster's shared key yet (a key share from another "
            "member); no patient can be named until it has");
    }
    if (!cluster_key) return keys_.keyed_hash(message);
    Hash mac{};
    unsigned int size = 0;
    if (HMAC(EVP_sha256(), cluster_key->view().data(), static_cast<int>(cluster_key->size()),
             u8(ByteView(message)), message.size(), u8(std::span<std::byte>(mac)),
             &size) == nullptr ||
        size != mac.size())
      return Status::Internal("HMAC-SHA256 failed in OpenSSL");
    return mac;
  }

  // Caller holds mu_ (or is open()). Reads the stored secret, if any, and derives the key.
  Status load_cluster_secret() {
    MEDGATE_ASSIGN_OR_RETURN(std::optional<hsm::SecretBytes> secret, read_cluster_secret());
    if (!secret) return Status::Ok();
    return use_secret(secret->view());
  }

  // Caller holds mu_ (or is open()).
  Status use_secret(ByteView secret) {
    MEDGATE_ASSIGN_OR_RETURN(hsm::SecretBytes pseudonym_key,
                             derive_from_secret(secret, kClusterPseudonymInfo));
    MEDGATE_ASSIGN_OR_RETURN(hsm::SecretBytes sharing_key,
                             derive_from_secret(secret, kClusterDataKeysInfo));
    cluster_pseudonym_key_ = std::make_shared<const hsm::SecretBytes>(std::move(pseudonym_key));
    sharing_key_ = std::make_shared<const hsm::SecretBytes>(std::move(sharing_key));
    cluster_secret_id_ = secret_id_of(secret);
    return Status::Ok();
  }

  Result<std::optional<hsm::SecretBytes>> read_cluster_secret() {
    MEDGATE_ASSIGN_OR_RETURN(sql::Statement st,
                             db_.prepare("SELECT secret_id, wrapped FROM cluster_secret"));
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step != sql::Statement::Step::kRow) return std::optional<hsm::SecretBytes>();
    ByteView id = st.column_blob(0);
    ByteView blob = st.column_blob(1);
    Bytes wrapped(blob.begin(), blob.end());
    Hash stored_id{};
    if (id.size() != stored_id.size())
      return Status::Corruption("the vault's cluster secret id is not 32 bytes");
    std::copy(id.begin(), id.end(), stored_id.begin());
    Result<hsm::SecretBytes> secret = keys_.unwrap_key(wrapped, as_bytes(kClusterSecretContext));
    if (!secret.ok())
      return secret.status().with_context("unwrap the cluster's shared secret in the vault");
    if (secret_id_of(secret->view()) != stored_id)
      return Status::Corruption("the vault's cluster secret does not match its id");
    return std::optional<hsm::SecretBytes>(std::move(secret).value());
  }

  Result<std::optional<Hash>> secret_id() {
    std::lock_guard lk(mu_);
    return cluster_secret_id_;
  }

  Result<hsm::SecretBytes> secret() {
    std::lock_guard lk(mu_);
    MEDGATE_ASSIGN_OR_RETURN(std::optional<hsm::SecretBytes> secret, read_cluster_secret());
    if (!secret) return Status::NotFound("the vault holds no cluster secret");
    return std::move(*secret);
  }

  Status adopt(ByteView secret) {
    if (secret.size() != kKeySize)
      return Status::InvalidArgument(
          fmt::format("a cluster secret is {} bytes, not {}", kKeySize, secret.size()));
    const Hash id = secret_id_of(secret);
    std::lock_guard lk(mu_);
    MEDGATE_ASSIGN_OR_RETURN(std::optional<hsm::SecretBytes> held, read_cluster_secret());
    if (held) {
      if (secret_id_of(held->view()) == id) return Status::Ok();
      return Status::FailedPrecondition(
          fmt::format("the vault already holds another cluster secret ({}); refusing to replace it",
                      to_hex(ByteView(secret_id_of(held->view())).first(8))));
    }
    MEDGATE_ASSIGN_OR_RETURN(std::uint64_t patients, count_patients());
    if (patients > 0)
      return Status::FailedPrecondition(fmt::format(
          "the vault holds {} patient record(s) whose pseudonyms were made with this key store's "
          "own key; a cluster's members must share one pseudonym key, so this data directory "
          "cannot found or join a cluster (make the cluster first, then connect devices)",
          patients));
    MEDGATE_ASSIGN_OR_RETURN(Bytes wrapped,
                             keys_.wrap_key(secret, as_bytes(kClusterSecretContext)));
    MEDGATE_ASSIGN_OR_RETURN(
        sql::Statement st,
        db_.prepare("INSERT INTO cluster_secret (id, secret_id, wrapped, adopted_us) "
                    "VALUES (1, ?, ?, ?)"));
    st.bind(1, ByteView(id)).bind(2, ByteView(wrapped)).bind(3, ledger::now_us());
    MEDGATE_RETURN_IF_ERROR(st.run());
    MEDGATE_RETURN_IF_ERROR(use_secret(secret));
    pseudonyms_ = LruCache<CachedIdentifier, Pseudonym>(kCachedPseudonyms);
    return Status::Ok();
  }

  void require_secret(bool required) {
    std::lock_guard lk(mu_);
    cluster_required_ = required;
  }

  Status ensure(const Pseudonym& p) {
    std::lock_guard lk(mu_);
    MEDGATE_ASSIGN_OR_RETURN(std::optional<PatientInfo> info, read_info(p));
    if (info) return Status::Ok();
    if (!cluster_pseudonym_key_)
      return Status::FailedPrecondition(fmt::format(
          "patient {} is known here only by pseudonym, which only a cluster's member can use",
          p.prefix()));
    return create_record(p, std::nullopt);
  }

  Result<std::uint64_t> patients() {
    std::lock_guard lk(mu_);
    return count_patients();
  }

  Result<Bytes> encrypt(const Pseudonym& p, ByteView plaintext, ByteView aad) {
    MEDGATE_ASSIGN_OR_RETURN(OwnKey key, data_key(p, "nothing more can be stored for them"));
    if (!key.id) return seal(key.key->view(), kPayloadLabel, p, aad, plaintext);
    // 0x02 || key id || iv || ciphertext || tag: the id tells any member whose key it is.
    MEDGATE_ASSIGN_OR_RETURN(
        Bytes sealed, hsm::gcm_seal(key.key->view(), payload_aad(p, *key.id, aad), plaintext));
    Bytes out{kFormatWithKeyId};
    out.insert(out.end(), key.id->begin(), key.id->end());
    out.insert(out.end(), sealed.begin(), sealed.end());
    return out;
  }

  Result<Bytes> decrypt(const Pseudonym& p, ByteView ciphertext, ByteView aad) {
    if (!ciphertext.empty() && ciphertext[0] == kFormatWithKeyId) {
      if (ciphertext.size() < 1 + kDataKeyIdSize)
        return Status::VerificationFailed(
            fmt::format("patient {}: ciphertext too short for its key id", p.prefix()));
      DataKeyId id{};
      std::copy_n(ciphertext.begin() + 1, kDataKeyIdSize, id.begin());
      MEDGATE_ASSIGN_OR_RETURN(OwnKey own, data_key(p, "the data can no longer be decrypted"));
      std::shared_ptr<const hsm::SecretBytes> key = own.key;
      if (!own.id || *own.id != id) {
        MEDGATE_ASSIGN_OR_RETURN(key, member_key(p, id));
      }
      Result<Bytes> out = hsm::gcm_open(key->view(), payload_aad(p, id, aad),
                                        ciphertext.subspan(1 + kDataKeyIdSize));
      if (!out.ok())
        return Status::VerificationFailed(fmt::format(
            "patient {}: ciphertext does not authenticate: it was altered, or belongs to another "
            "patient or context",
            p.prefix()));
      return out;
    }
    MEDGATE_ASSIGN_OR_RETURN(OwnKey key, data_key(p, "the data can no longer be decrypted"));
    Result<Bytes> out = open_sealed(key.key->view(), kPayloadLabel, p, aad, ciphertext);
    if (!out.ok()) return out.status().with_context(fmt::format("patient {}", p.prefix()));
    return out;
  }

  static Bytes payload_aad(const Pseudonym& p, const DataKeyId& id, ByteView aad) {
    return concat({as_bytes(kPayloadLabel), p.bytes, id, aad});
  }

  // Another member's data key for the patient: from the cache, the vault, or (once) the key
  // source, then kept wrapped by this key store's KEK. Refuses patients that are not active.
  Result<std::shared_ptr<const hsm::SecretBytes>> member_key(const Pseudonym& p,
                                                             const DataKeyId& id) {
    const std::string name = fmt::format("the data key {} of patient {}", to_hex(id), p.prefix());
    DataKeySource source;
    std::shared_ptr<const hsm::SecretBytes> sharing_key;
    {
      std::lock_guard lk(mu_);
      if (auto it = member_keys_.find({p, id}); it != member_keys_.end()) return it->second;
      MEDGATE_ASSIGN_OR_RETURN(sql::Statement st,
                               db_.prepare("SELECT wrapped FROM member_keys WHERE pseudonym = ? "
                                           "AND key_id = ?"));
      st.bind(1, ByteView(p.bytes)).bind(2, ByteView(id));
      MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
      if (step == sql::Statement::Step::kRow) {
        ByteView blob = st.column_blob(0);
        Bytes wrapped(blob.begin(), blob.end());
        Result<hsm::SecretBytes> key = keys_.unwrap_key(wrapped, member_key_context(p, id));
        if (!key.ok()) return key.status().with_context("unwrap " + name);
        return remember_member_key(p, id, std::move(key).value());
      }
      source = key_source_;
      sharing_key = sharing_key_;
    }
    if (!source || !sharing_key)
      return Status::NotFound(name + " is another member's and this vault has no way to get it");
    // Outside the lock: the source asks the cluster.
    MEDGATE_ASSIGN_OR_RETURN(std::optional<Bytes> sealed, source(p, id));
    if (!sealed)
      return Status::Unavailable(name +
                                 " (a reading from another member) has not been published yet");
    Result<Bytes> raw = hsm::gcm_open(sharing_key->view(), member_key_aad(p, id), *sealed);
    if (!raw.ok())
      return Status::VerificationFailed(name +
                                        " as published does not open with the cluster's key");
    hsm::SecretBytes key(std::move(raw).value());
    if (key.size() != kKeySize)
      return Status::Corruption(fmt::format("{} is {} bytes, not {}", name, key.size(), kKeySize));
    MEDGATE_ASSIGN_OR_RETURN(Bytes wrapped, keys_.wrap_key(key.view(), member_key_context(p, id)));
    std::lock_guard lk(mu_);
    MEDGATE_ASSIGN_OR_RETURN(std::optional<PatientInfo> info, read_info(p));
    if (!info) return Status::NotFound(fmt::format("no patient {} in the vault", p.prefix()));
    if (info->state != PatientState::kActive)
      return refusal(*info, "the data can no longer be decrypted");
    MEDGATE_ASSIGN_OR_RETURN(
        sql::Statement st,
        db_.prepare("INSERT OR REPLACE INTO member_keys (pseudonym, key_id, wrapped, received_us) "
                    "VALUES (?, ?, ?, ?)"));
    st.bind(1, ByteView(p.bytes))
        .bind(2, ByteView(id))
        .bind(3, ByteView(wrapped))
        .bind(4, ledger::now_us());
    MEDGATE_RETURN_IF_ERROR(st.run());
    return remember_member_key(p, id, std::move(key));
  }

  // Caller holds mu_.
  std::shared_ptr<const hsm::SecretBytes> remember_member_key(const Pseudonym& p,
                                                              const DataKeyId& id,
                                                              hsm::SecretBytes key) {
    if (member_keys_.size() >= kCachedKeys) member_keys_.clear();
    auto shared = std::make_shared<const hsm::SecretBytes>(std::move(key));
    member_keys_[{p, id}] = shared;
    return shared;
  }

  // Caller holds mu_.
  void forget_member_keys(const Pseudonym& p) {
    auto it = member_keys_.lower_bound({p, DataKeyId{}});
    while (it != member_keys_.end() && it->first.first == p) it = member_keys_.erase(it);
  }

  Result<std::vector<DataKeyExport>> keys_to_publish(std::size_t limit) {
    std::vector<std::tuple<Pseudonym, DataKeyId, Bytes>> rows;
    std::shared_ptr<const hsm::SecretBytes> sharing_key;
    {
      std::lock_guard lk(mu_);
      sharing_key = sharing_key_;
      if (!sharing_key) return std::vector<DataKeyExport>();
      MEDGATE_ASSIGN_OR_RETURN(
          sql::Statement st,
          db_.prepare("SELECT pseudonym, key_id, wrapped_key FROM patients WHERE published = 0 "
                      "AND state = 0 AND key_id IS NOT NULL LIMIT ?"));
      st.bind(1, static_cast<std::uint64_t>(limit));
      for (;;) {
        MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
        if (step == sql::Statement::Step::kDone) break;
        MEDGATE_ASSIGN_OR_RETURN(Pseudonym p, pseudonym_column(st, 0));
        ByteView id = st.column_blob(1);
        ByteView wrapped = st.column_blob(2);
        if (id.size() != kDataKeyIdSize) {
          log(LogLevel::kError, "vault.publish",
              "patient {} has a data key id of {} bytes; it is not published", p.prefix(),
              id.size());
          continue;
        }
        DataKeyId key_id{};
        std::copy(id.begin(), id.end(), key_id.begin());
        rows.emplace_back(p, key_id, Bytes(wrapped.begin(), wrapped.end()));
      }
    }
    std::vector<DataKeyExport> out;
    for (auto& [p, id, wrapped] : rows) {
      Result<hsm::SecretBytes> key = keys_.unwrap_key(wrapped, data_key_context(p));
      if (!key.ok()) {
        if (key.status().code() == StatusCode::kUnavailable) return key.status();  // retry later
        // This key can never be published: say so once and let the others go.
        log(LogLevel::kError, "vault.publish",
            "the data key of patient {} cannot be published to the cluster: {}", p.prefix(),
            key.status().message());
        std::lock_guard lk(mu_);
        MEDGATE_ASSIGN_OR_RETURN(
            sql::Statement st,
            db_.prepare("UPDATE patients SET published = 2 WHERE pseudonym = ? AND key_id = ?"));
        st.bind(1, ByteView(p.bytes)).bind(2, ByteView(id));
        MEDGATE_RETURN_IF_ERROR(st.run());
        continue;
      }
      MEDGATE_ASSIGN_OR_RETURN(
          Bytes sealed, hsm::gcm_seal(sharing_key->view(), member_key_aad(p, id), key->view()));
      out.push_back({p, id, std::move(sealed)});
    }
    return out;
  }

  Result<std::optional<Bytes>> seal_shared(ByteView secret, ByteView label) {
    std::shared_ptr<const hsm::SecretBytes> key;
    {
      std::lock_guard lk(mu_);
      key = sharing_key_;
    }
    if (!key) return std::optional<Bytes>();
    MEDGATE_ASSIGN_OR_RETURN(Bytes sealed, hsm::gcm_seal(key->view(), label, secret));
    return std::optional<Bytes>(std::move(sealed));
  }

  Result<hsm::SecretBytes> open_shared(ByteView sealed, ByteView label) {
    std::shared_ptr<const hsm::SecretBytes> key;
    {
      std::lock_guard lk(mu_);
      key = sharing_key_;
    }
    if (!key) return Status::FailedPrecondition("this vault holds no cluster secret");
    MEDGATE_ASSIGN_OR_RETURN(Bytes plain, hsm::gcm_open(key->view(), label, sealed));
    return hsm::SecretBytes(std::move(plain));
  }

  Status mark_published(const Pseudonym& p, const DataKeyId& id) {
    std::lock_guard lk(mu_);
    MEDGATE_ASSIGN_OR_RETURN(
        sql::Statement st,
        db_.prepare("UPDATE patients SET published = 1 WHERE pseudonym = ? AND key_id = ?"));
    st.bind(1, ByteView(p.bytes)).bind(2, ByteView(id));
    return st.run();
  }

  void set_source(DataKeySource source) {
    std::lock_guard lk(mu_);
    key_source_ = std::move(source);
  }

  Result<bool> apply_erasure(const Pseudonym& p, std::uint64_t entry) {
    std::lock_guard lk(mu_);
    bool changed = false;
    {
      MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_));
      MEDGATE_ASSIGN_OR_RETURN(std::optional<PatientInfo> info, read_info(p));
      const std::uint64_t now = ledger::now_us();
      if (!info) {
        // Never seen here: a tombstone, so that the patient is refused if named here later.
        MEDGATE_ASSIGN_OR_RETURN(
            sql::Statement st,
            db_.prepare("INSERT INTO patients (pseudonym, state, created_us, erasure_entry, "
                        "erased_us) VALUES (?, 2, ?, ?, ?)"));
        st.bind(1, ByteView(p.bytes)).bind(2, now).bind(3, entry).bind(4, now);
        MEDGATE_RETURN_IF_ERROR(st.run());
        changed = true;
      } else if (info->state == PatientState::kActive) {
        MEDGATE_ASSIGN_OR_RETURN(
            sql::Statement st,
            db_.prepare("UPDATE patients SET state = 2, wrapped_key = NULL, identifier = NULL, "
                        "published = 1, erasure_entry = ?, erased_us = ? WHERE pseudonym = ?"));
        st.bind(1, entry).bind(2, now).bind(3, ByteView(p.bytes));
        MEDGATE_RETURN_IF_ERROR(st.run());
        changed = true;
      }
      // (An erasure pending here is this member's own: its protocol finishes it.)
      MEDGATE_ASSIGN_OR_RETURN(sql::Statement del,
                               db_.prepare("DELETE FROM member_keys WHERE pseudonym = ?"));
      del.bind(1, ByteView(p.bytes));
      MEDGATE_RETURN_IF_ERROR(del.run());
      changed = changed || sqlite3_changes(db_.handle()) > 0;
      MEDGATE_RETURN_IF_ERROR(tx.commit());
    }
    keys_cache_.erase(p);
    forget_member_keys(p);
    if (changed)
      if (Status s = truncate_wal(db_); !s.ok())
        log(LogLevel::kWarning, "vault.checkpoint",
            "patient {} is erased, but the vault's WAL could not be truncated yet: {}", p.prefix(),
            s.message());
    return changed;
  }

  Result<std::string> identifier(const Pseudonym& p) {
    MEDGATE_ASSIGN_OR_RETURN(OwnKey own, data_key(p, "the identifier is gone"));
    const std::shared_ptr<const hsm::SecretBytes>& key = own.key;
    Bytes sealed;
    {
      std::lock_guard lk(mu_);
      MEDGATE_ASSIGN_OR_RETURN(sql::Statement st,
                               db_.prepare("SELECT identifier FROM patients WHERE pseudonym = ?"));
      st.bind(1, ByteView(p.bytes));
      MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
      if (step != sql::Statement::Step::kRow || st.column_is_null(0))
        return Status::FailedPrecondition(
            fmt::format("patient {} has no identifier in the vault any more", p.prefix()));
      ByteView blob = st.column_blob(0);
      sealed.assign(blob.begin(), blob.end());
    }
    Result<Bytes> plain = open_sealed(key->view(), kIdentifierLabel, p, {}, sealed);
    if (!plain.ok())
      return plain.status().with_context(fmt::format("identifier of patient {}", p.prefix()));
    std::string id = to_string(*plain);
    secure_wipe(*plain);
    return id;
  }

  Result<PatientInfo> info(const Pseudonym& p) {
    std::lock_guard lk(mu_);
    MEDGATE_ASSIGN_OR_RETURN(std::optional<PatientInfo> info, read_info(p));
    if (!info) return Status::NotFound(fmt::format("no patient {} in the vault", p.prefix()));
    return *info;
  }

  Result<PendingErasure> begin_erase(const Pseudonym& p, ErasureRequest request) {
    std::lock_guard lk(mu_);
    MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_));
    MEDGATE_ASSIGN_OR_RETURN(std::optional<PatientInfo> info, read_info(p));
    if (!info) return Status::NotFound(fmt::format("no patient {} in the vault", p.prefix()));
    if (info->state != PatientState::kActive) return refusal(*info, "it cannot be erased again");
    PendingErasure pending{p, ledger::now_us(), std::move(request)};
    MEDGATE_ASSIGN_OR_RETURN(
        sql::Statement st,
        db_.prepare("UPDATE patients SET state = 1, erase_requested_us = ?, erase_actor = ?, "
                    "erase_reason = ?, erase_ledger_size = ? WHERE pseudonym = ?"));
    st.bind(1, pending.requested_us)
        .bind(2, std::string_view(pending.request.actor))
        .bind(3, std::string_view(pending.request.reason))
        .bind(4, pending.request.ledger_size)
        .bind(5, ByteView(p.bytes));
    MEDGATE_RETURN_IF_ERROR(st.run());
    MEDGATE_RETURN_IF_ERROR(tx.commit());
    keys_cache_.erase(p);
    forget_member_keys(p);
    return pending;
  }

  Result<PatientInfo> finish_erase(const Pseudonym& p, std::uint64_t entry) {
    std::lock_guard lk(mu_);
    {
      MEDGATE_ASSIGN_OR_RETURN(auto tx, sql::Transaction::immediate(db_));
      MEDGATE_ASSIGN_OR_RETURN(std::optional<PatientInfo> info, read_info(p));
      if (!info) return Status::NotFound(fmt::format("no patient {} in the vault", p.prefix()));
      if (info->state != PatientState::kErasePending)
        return info->state == PatientState::kErased
                   ? refusal(*info, "it cannot be erased again")
                   : Status::FailedPrecondition(fmt::format(
                         "patient {} has no erasure pending; begin_erase comes first", p.prefix()));
      MEDGATE_ASSIGN_OR_RETURN(
          sql::Statement st,
          db_.prepare("UPDATE patients SET state = 2, wrapped_key = NULL, identifier = NULL, "
                      "erase_reason = NULL, erasure_entry = ?, erased_us = ? WHERE pseudonym = ?"));
      st.bind(1, entry).bind(2, ledger::now_us()).bind(3, ByteView(p.bytes));
      MEDGATE_RETURN_IF_ERROR(st.run());
      MEDGATE_ASSIGN_OR_RETURN(sql::Statement del,
                               db_.prepare("DELETE FROM member_keys WHERE pseudonym = ?"));
      del.bind(1, ByteView(p.bytes));
      MEDGATE_RETURN_IF_ERROR(del.run());
      MEDGATE_RETURN_IF_ERROR(tx.commit());
    }
    keys_cache_.erase(p);
    forget_member_keys(p);
    // The erasure is durable; a WAL that cannot be truncated now is truncated at the next open.
    if (Status s = truncate_wal(db_); !s.ok())
      log(LogLevel::kWarning, "vault.checkpoint",
          "patient {} is erased, but the vault's WAL could not be truncated yet: {}", p.prefix(),
          s.message());
    MEDGATE_ASSIGN_OR_RETURN(std::optional<PatientInfo> info, read_info(p));
    if (!info) return Status::Internal("an erased record disappeared");
    return *info;
  }

  Result<std::vector<PendingErasure>> pending_erasures() {
    std::lock_guard lk(mu_);
    MEDGATE_ASSIGN_OR_RETURN(
        sql::Statement st,
        db_.prepare("SELECT pseudonym, erase_requested_us, erase_actor, erase_reason, "
                    "erase_ledger_size FROM patients WHERE state = 1 ORDER BY erase_requested_us"));
    std::vector<PendingErasure> out;
    for (;;) {
      MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
      if (step == sql::Statement::Step::kDone) break;
      MEDGATE_ASSIGN_OR_RETURN(Pseudonym p, pseudonym_column(st, 0));
      out.push_back(
          {p, st.column_uint(1), {st.column_text(2), st.column_text(3), st.column_uint(4)}});
    }
    return out;
  }

 private:
  static Result<Pseudonym> pseudonym_column(const sql::Statement& st, int column) {
    ByteView b = st.column_blob(column);
    if (b.size() != sizeof(Hash))
      return Status::Corruption(
          fmt::format("the vault holds a pseudonym of {} bytes instead of 32", b.size()));
    Pseudonym p;
    std::copy(b.begin(), b.end(), p.bytes.begin());
    return p;
  }

  static Status refusal(const PatientInfo& info, std::string_view consequence) {
    if (info.state == PatientState::kErased)
      return Status::FailedPrecondition(fmt::format(
          "patient {} was erased at {}{}; {}", info.pseudonym.prefix(),
          ledger::format_time(info.erased_us.value_or(0)),
          info.erasure_entry ? fmt::format(" (ledger entry {})", *info.erasure_entry) : "",
          consequence));
    return Status::FailedPrecondition(
        fmt::format("patient {} is being erased (requested at {}); {}", info.pseudonym.prefix(),
                    ledger::format_time(info.erase_requested_us.value_or(0)), consequence));
  }

  // Caller holds mu_.
  Result<std::optional<PatientInfo>> read_info(const Pseudonym& p) {
    MEDGATE_ASSIGN_OR_RETURN(
        sql::Statement st,
        db_.prepare("SELECT state, created_us, erase_requested_us, erased_us, erasure_entry FROM "
                    "patients WHERE pseudonym = ?"));
    st.bind(1, ByteView(p.bytes));
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step == sql::Statement::Step::kDone) return std::optional<PatientInfo>();
    PatientInfo info;
    info.pseudonym = p;
    switch (st.column_int(0)) {
      case static_cast<std::int64_t>(StoredState::kActive):
        info.state = PatientState::kActive;
        break;
      case static_cast<std::int64_t>(StoredState::kErasePending):
        info.state = PatientState::kErasePending;
        break;
      case static_cast<std::int64_t>(StoredState::kErased):
        info.state = PatientState::kErased;
        break;
      default:
        return Status::Corruption(fmt::format("patient {} has an unknown state {} in the vault",
                                              p.prefix(), st.column_int(0)));
    }
    info.created_us = st.column_uint(1);
    info.erase_requested_us = optional_uint(st, 2);
    info.erased_us = optional_uint(st, 3);
    info.erasure_entry = optional_uint(st, 4);
    return std::optional<PatientInfo>(info);
  }

  // Caller holds mu_. A fresh data key from the key store's RNG, kept only wrapped; the identifier
  // kept only encrypted under it.
  // `id` absent: a patient this member knows only by pseudonym (a device bound at another member of
  // the cluster); the record has a data key and no identifier.
  Status create_record(const Pseudonym& p, std::optional<std::string_view> id) {
    MEDGATE_ASSIGN_OR_RETURN(Bytes raw, keys_.random(kKeySize));
    hsm::SecretBytes key(std::move(raw));
    if (key.size() != kKeySize)
      return Status::Internal(
          fmt::format("the key store gave {} random bytes instead of {}", key.size(), kKeySize));
    Result<Bytes> wrapped = keys_.wrap_key(key.view(), data_key_context(p));
    if (!wrapped.ok())
      return wrapped.status().with_context(
          fmt::format("wrap the data key of patient {}", p.prefix()));
    std::optional<Bytes> sealed_id;
    if (id) {
      MEDGATE_ASSIGN_OR_RETURN(sealed_id, seal(key.view(), kIdentifierLabel, p, {}, as_bytes(*id)));
    }
    // In a cluster the key gets an id (its ciphertexts carry it) and waits to be published.
    std::optional<DataKeyId> key_id;
    if (sharing_key_) {
      key_id.emplace();
      if (RAND_bytes(u8(std::span<std::byte>(*key_id)), static_cast<int>(key_id->size())) != 1)
        return Status::Internal("OpenSSL's random generator failed");
    }
    MEDGATE_ASSIGN_OR_RETURN(
        sql::Statement st,
        db_.prepare("INSERT INTO patients (pseudonym, state, created_us, wrapped_key, identifier, "
                    "key_id, published) VALUES (?, 0, ?, ?, ?, ?, ?)"));
    st.bind(1, ByteView(p.bytes)).bind(2, ledger::now_us()).bind(3, ByteView(*wrapped));
    if (sealed_id)
      st.bind(4, ByteView(*sealed_id));
    else
      st.bind_null(4);
    if (key_id)
      st.bind(5, ByteView(*key_id)).bind(6, std::uint64_t{0});
    else
      st.bind_null(5).bind(6, std::uint64_t{1});
    MEDGATE_RETURN_IF_ERROR(st.run());
    keys_cache_.put(p, OwnKey{std::make_shared<const hsm::SecretBytes>(std::move(key)), key_id});
    return Status::Ok();
  }

  // The patient's unwrapped data key, from the cache or unwrapped once. Refuses erased and
  // being-erased patients with `consequence` in the message.
  Result<OwnKey> data_key(const Pseudonym& p, std::string_view consequence) {
    std::lock_guard lk(mu_);
    if (const OwnKey* key = keys_cache_.find(p)) return *key;
    MEDGATE_ASSIGN_OR_RETURN(std::optional<PatientInfo> info, read_info(p));
    if (!info) return Status::NotFound(fmt::format("no patient {} in the vault", p.prefix()));
    if (info->state != PatientState::kActive) return refusal(*info, consequence);
    MEDGATE_ASSIGN_OR_RETURN(
        sql::Statement st,
        db_.prepare("SELECT wrapped_key, key_id FROM patients WHERE pseudonym = ?"));
    st.bind(1, ByteView(p.bytes));
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step != sql::Statement::Step::kRow || st.column_is_null(0))
      return Status::Corruption(
          fmt::format("patient {} is active but has no wrapped data key", p.prefix()));
    ByteView blob = st.column_blob(0);
    Bytes wrapped(blob.begin(), blob.end());
    std::optional<DataKeyId> key_id;
    if (!st.column_is_null(1)) {
      ByteView id = st.column_blob(1);
      if (id.size() != kDataKeyIdSize)
        return Status::Corruption(
            fmt::format("patient {} has a key id of {} bytes", p.prefix(), id.size()));
      key_id.emplace();
      std::copy(id.begin(), id.end(), key_id->begin());
    }
    Result<hsm::SecretBytes> key = keys_.unwrap_key(wrapped, data_key_context(p));
    if (!key.ok()) {
      if (key.status().code() == StatusCode::kVerificationFailed)
        return Status::VerificationFailed(fmt::format(
            "the data key of patient {} does not unwrap (altered, or wrapped by another key "
            "store): {}",
            p.prefix(), key.status().message()));
      return key.status().with_context(
          fmt::format("unwrap the data key of patient {}", p.prefix()));
    }
    if (key->size() != kKeySize)
      return Status::Corruption(fmt::format("the data key of patient {} is {} bytes, not {}",
                                            p.prefix(), key->size(), kKeySize));
    OwnKey own{std::make_shared<const hsm::SecretBytes>(std::move(key).value()), key_id};
    keys_cache_.put(p, own);
    return own;
  }

  // Caller holds mu_.
  Result<std::uint64_t> count_patients() {
    // Erased records (and the tombstones of erasures decided elsewhere) name nobody any more.
    MEDGATE_ASSIGN_OR_RETURN(sql::Statement st,
                             db_.prepare("SELECT count(*) FROM patients WHERE state != 2"));
    MEDGATE_ASSIGN_OR_RETURN(auto step, st.step());
    if (step != sql::Statement::Step::kRow) return Status::Internal("count(*) gave no row");
    return st.column_uint(0);
  }

  VaultLock lock_;
  std::mutex mu_;
  // Set once the vault holds a cluster secret (guarded by mu_; shared so that keyed_pseudonym
  // can use it outside the lock).
  std::shared_ptr<const hsm::SecretBytes> cluster_pseudonym_key_;
  std::optional<Hash> cluster_secret_id_;
  bool cluster_required_ = false;
  sql::Database db_;
  hsm::KeyStore& keys_;
  LruCache<CachedIdentifier, Pseudonym> pseudonyms_{kCachedPseudonyms};
  LruCache<Pseudonym, OwnKey> keys_cache_{kCachedKeys};
  // Other members' data keys, unwrapped (bounded: cleared when full).
  std::map<std::pair<Pseudonym, DataKeyId>, std::shared_ptr<const hsm::SecretBytes>> member_keys_;
  // Set once the vault holds a cluster secret: seals this member's data keys for the others.
  std::shared_ptr<const hsm::SecretBytes> sharing_key_;
  DataKeySource key_source_;
};

Result<std::unique_ptr<Vault>> Vault::open(const std::filesystem::path& path, hsm::KeyStore& keys,
                                           bool must_exist) {
  if (must_exist && !std::filesystem::exists(path))
    return Status::FailedPrecondition(fmt::format(
        "the vault {} is missing: restore it from a backup (with an empty vault every reading "
        "stored so far could no longer be decrypted); a new data directory is made with "
        "medctl init",
        path.string()));
  MEDGATE_ASSIGN_OR_RETURN(VaultLock lock, VaultLock::acquire(path));
  // A new vault is created 0600 (SQLite gives its -wal and -shm files the same mode): wrapped keys
  // are useless without the key store, but the file is nobody else's business either.
  if (int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600); fd >= 0) {
    ::close(fd);
    log(LogLevel::kNotice, "vault.create", "created an empty vault {}", path.string());
  }
  MEDGATE_ASSIGN_OR_RETURN(sql::Database db,
                           sql::Database::open(path, sql::Database::Mode::kCreate));
  MEDGATE_RETURN_IF_ERROR(check_is_vault(db, path));
  // secure_delete: freed bytes (a destroyed wrapped key) are overwritten with zeros, not left in
  // free space. synchronous=FULL: a commit returns after fsync.
  {
    MEDGATE_ASSIGN_OR_RETURN(sql::Statement wal, db.prepare("PRAGMA journal_mode = WAL"));
    MEDGATE_ASSIGN_OR_RETURN(auto step, wal.step());
    if (step != sql::Statement::Step::kRow || wal.column_text(0) != "wal")
      return Status::IOError(fmt::format("{}: cannot switch the vault to WAL mode", path.string()));
  }  // finalized here: an unfinished statement would keep the migrations from committing
  MEDGATE_RETURN_IF_ERROR(db.exec("PRAGMA synchronous = FULL; PRAGMA secure_delete = ON"));
  MEDGATE_ASSIGN_OR_RETURN(std::int64_t secure, pragma_int(db, "secure_delete"));
  if (secure != 1)
    return Status::Internal(
        "this SQLite does not honour PRAGMA secure_delete; refusing to store "
        "keys that could not be shredded");
  if (Status s = migrate(db); !s.ok()) return s.with_context(path.string());
  // A crash between an erasure's commit and its checkpoint can leave old pages in the WAL.
  if (Status s = truncate_wal(db); !s.ok()) return s.with_context(path.string());
  auto impl = std::make_unique<Impl>(std::move(lock), std::move(db), keys);
  if (Status s = impl->load_cluster_secret(); !s.ok()) return s.with_context(path.string());
  return std::unique_ptr<Vault>(new Vault(std::move(impl)));
}

Vault::Vault(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Vault::~Vault() = default;

Result<Pseudonym> Vault::pseudonym(std::string_view patient_id) {
  return impl_->pseudonym(patient_id, true);
}
Result<Pseudonym> Vault::find(std::string_view patient_id) {
  return impl_->pseudonym(patient_id, false);
}
Result<Bytes> Vault::encrypt(const Pseudonym& patient, ByteView plaintext, ByteView aad) {
  return impl_->encrypt(patient, plaintext, aad);
}
Result<Bytes> Vault::decrypt(const Pseudonym& patient, ByteView ciphertext, ByteView aad) {
  return impl_->decrypt(patient, ciphertext, aad);
}
Result<std::string> Vault::identifier(const Pseudonym& patient) {
  return impl_->identifier(patient);
}
Result<PatientInfo> Vault::info(const Pseudonym& patient) {
  return impl_->info(patient);
}
Result<PendingErasure> Vault::begin_erase(const Pseudonym& patient, ErasureRequest request) {
  return impl_->begin_erase(patient, std::move(request));
}
Result<PatientInfo> Vault::finish_erase(const Pseudonym& patient, std::uint64_t ledger_entry) {
  return impl_->finish_erase(patient, ledger_entry);
}
Result<std::vector<PendingErasure>> Vault::pending_erasures() {
  return impl_->pending_erasures();
}
Result<std::optional<Hash>> Vault::cluster_secret_id() {
  return impl_->secret_id();
}
Status Vault::adopt_cluster_secret(ByteView secret) {
  return impl_->adopt(secret);
}
Result<hsm::SecretBytes> Vault::cluster_secret() {
  return impl_->secret();
}
void Vault::require_cluster_secret(bool required) {
  impl_->require_secret(required);
}
Status Vault::ensure_patient(const Pseudonym& patient) {
  return impl_->ensure(patient);
}
Result<std::uint64_t> Vault::patient_count() {
  return impl_->patients();
}
Result<std::vector<DataKeyExport>> Vault::keys_to_publish(std::size_t limit) {
  return impl_->keys_to_publish(limit);
}
Status Vault::mark_published(const Pseudonym& patient, const DataKeyId& key) {
  return impl_->mark_published(patient, key);
}
void Vault::set_key_source(DataKeySource source) {
  impl_->set_source(std::move(source));
}
Result<std::optional<Bytes>> Vault::seal_for_members(ByteView secret, ByteView label) {
  return impl_->seal_shared(secret, label);
}
Result<hsm::SecretBytes> Vault::open_from_member(ByteView sealed, ByteView label) {
  return impl_->open_shared(sealed, label);
}
Result<bool> Vault::apply_erasure(const Pseudonym& patient, std::uint64_t ledger_entry) {
  return impl_->apply_erasure(patient, ledger_entry);
}

}  // namespace medgate::appliance
