#include "hsm/tpm2/tpm2_key_store.h"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <tss2/tss2_mu.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <string_view>

#include "hsm/tpm2/key_files.h"
#include "hsm/tpm2/tpm_device.h"

namespace medgate::hsm::tpm2 {
namespace {

constexpr std::string_view kDefaultTcti = "device:/dev/tpmrm0";
constexpr std::string_view kKeyOrderFile = "signing-keys";
constexpr std::string_view kSecretPublic = "data-key-secret.pub";
constexpr std::string_view kSecretPrivate = "data-key-secret.priv";
constexpr std::string_view kSecretPcrs = "data-key-secret.pcrs";
constexpr std::string_view kAgreementPublic = "agreement-key.pub";
constexpr std::string_view kAgreementPrivate = "agreement-key.priv";
constexpr std::string_view kTlsPublic = "tls-key.pub";
constexpr std::string_view kTlsPrivate = "tls-key.priv";
constexpr std::size_t kP256Bytes = 32;
constexpr std::size_t kMaxFileBytes = 4096;
constexpr std::size_t kSecretBytes = 64;
constexpr std::size_t kMaxRandomBytes = 64 * 1024;
constexpr unsigned kPcrCount = 24;
// Attributes of the counter this store defines; an existing index must have exactly these.
constexpr TPMA_NV kCounterAttributes = (TPM2_NT_COUNTER << TPMA_NV_TPM2_NT_SHIFT) |
                                       TPMA_NV_OWNERWRITE | TPMA_NV_OWNERREAD | TPMA_NV_NO_DA;
// Attributes the TPM sets by itself as the index is used.
constexpr TPMA_NV kCounterStateAttributes =
    TPMA_NV_WRITTEN | TPMA_NV_WRITELOCKED | TPMA_NV_READLOCKED;

std::string hex32(std::uint32_t v) {
  std::array<char, 16> s{};
  std::snprintf(s.data(), s.size(), "0x%08x", v);
  return s.data();
}

std::string short_id(const KeyId& id) {
  return to_hex(id).substr(0, 16);
}

std::string pcr_list(const std::vector<unsigned>& pcrs) {
  std::string s;
  for (unsigned p : pcrs) s += (s.empty() ? "" : ",") + std::to_string(p);
  return s;
}

Result<std::vector<unsigned>> parse_pcr_list(std::string_view text, const std::string& where) {
  std::vector<unsigned> pcrs;
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.remove_suffix(1);
  while (!text.empty()) {
    std::size_t comma = text.find(',');
    std::string_view item = text.substr(0, comma);
    text = comma == std::string_view::npos ? std::string_view() : text.substr(comma + 1);
    unsigned value = 0;
    if (item.empty() || item.size() > 2) return Status::Corruption(where + " is not a PCR list");
    for (char c : item) {
      if (c < '0' || c > '9') return Status::Corruption(where + " is not a PCR list");
      value = value * 10 + static_cast<unsigned>(c - '0');
    }
    if (value >= kPcrCount) return Status::Corruption(where + " names PCR " + std::string(item));
    pcrs.push_back(value);
  }
  return pcrs;
}

TPML_PCR_SELECTION pcr_selection(const std::vector<unsigned>& pcrs) {
  TPML_PCR_SELECTION selection{};
  selection.count = 1;
  selection.pcrSelections[0].hash = TPM2_ALG_SHA256;
  selection.pcrSelections[0].sizeofSelect = 3;
  for (unsigned p : pcrs)
    selection.pcrSelections[0].pcrSelect[p / 8] |= static_cast<BYTE>(1u << (p % 8));
  return selection;
}

// A P-256 key created under the storage primary for one `use` (sign or decrypt) with `scheme`:
// not restricted, never leaves the TPM, empty auth. (ECDSA and ECDH share the hash-scheme layout.)
TPM2B_PUBLIC p256_key_template(TPMA_OBJECT use, TPM2_ALG_ID scheme) {
  TPM2B_PUBLIC in{};
  TPMT_PUBLIC& p = in.publicArea;
  p.type = TPM2_ALG_ECC;
  p.nameAlg = TPM2_ALG_SHA256;
  p.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                       TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH | use;
  p.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL;
  p.parameters.eccDetail.scheme.scheme = scheme;
  p.parameters.eccDetail.scheme.details.anySig.hashAlg = TPM2_ALG_SHA256;
  p.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
  p.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  return in;
}

// An ECDSA signing key: sign-only (not restricted, so it signs digests computed outside).
TPM2B_PUBLIC signing_key_template() {
  return p256_key_template(TPMA_OBJECT_SIGN_ENCRYPT, TPM2_ALG_ECDSA);
}

// A key whose only use is ECDH (TPM2_ECDH_ZGen): decrypt but not sign, and not restricted (a
// restricted decrypt key is a storage parent and cannot do ZGen). The TPM accepts ZGen with
// scheme ECDH or NULL; ECDH says what the key is for.
TPM2B_PUBLIC agreement_key_template() {
  return p256_key_template(TPMA_OBJECT_DECRYPT, TPM2_ALG_ECDH);
}

template <typename T, TSS2_RC (*Marshal)(const T*, uint8_t[], size_t, size_t*)>
Result<Bytes> marshal(const T& value, const char* what) {
  Bytes out(sizeof(T) + 2);
  std::size_t offset = 0;
  TSS2_RC rc = Marshal(&value, reinterpret_cast<uint8_t*>(out.data()), out.size(), &offset);
  if (rc != TSS2_RC_SUCCESS)
    return Status::Internal(std::string("cannot marshal the ") + what + ": " + rc_text(rc));
  out.resize(offset);
  return out;
}

template <typename T, TSS2_RC (*Unmarshal)(const uint8_t[], size_t, size_t*, T*)>
Result<T> unmarshal(ByteView bytes, const std::string& what) {
  T value{};
  std::size_t offset = 0;
  TSS2_RC rc =
      Unmarshal(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), &offset, &value);
  if (rc != TSS2_RC_SUCCESS || offset != bytes.size())
    return Status::Corruption(
        what + " is damaged: it is not a marshalled TPM structure" +
        (rc != TSS2_RC_SUCCESS ? " (" + rc_text(rc) + ")" : " (extra bytes)"));
  return value;
}

Result<Bytes> marshal_public(const TPM2B_PUBLIC& p) {
  return marshal<TPM2B_PUBLIC, Tss2_MU_TPM2B_PUBLIC_Marshal>(p, "public area");
}
Result<Bytes> marshal_private(const TPM2B_PRIVATE& p) {
  return marshal<TPM2B_PRIVATE, Tss2_MU_TPM2B_PRIVATE_Marshal>(p, "private area");
}
Result<TPM2B_PUBLIC> unmarshal_public(ByteView b, const std::string& what) {
  return unmarshal<TPM2B_PUBLIC, Tss2_MU_TPM2B_PUBLIC_Unmarshal>(b, what);
}
Result<TPM2B_PRIVATE> unmarshal_private(ByteView b, const std::string& what) {
  return unmarshal<TPM2B_PRIVATE, Tss2_MU_TPM2B_PRIVATE_Unmarshal>(b, what);
}

// The SubjectPublicKeyInfo of an ECC P-256 key's public area, which must be made for `use` (a
// signing key's blob in the agreement key's file is damage, not a key to use).
Result<PublicKey> public_key_of(const TPM2B_PUBLIC& in, const std::string& what, KeyUse use) {
  const TPMT_PUBLIC& p = in.publicArea;
  const TPMA_OBJECT a = p.objectAttributes;
  const bool p256 = p.type == TPM2_ALG_ECC &&
                    p.parameters.eccDetail.curveID == TPM2_ECC_NIST_P256 &&
                    p.unique.ecc.x.size <= 32 && p.unique.ecc.y.size <= 32;
  switch (use) {
    case KeyUse::kSign:
      if (!p256 || (a & TPMA_OBJECT_SIGN_ENCRYPT) == 0)
        return Status::Corruption(what + " is not an ECDSA P-256 signing key");
      break;
    case KeyUse::kAgree:
      if (!p256 || (a & TPMA_OBJECT_DECRYPT) == 0 || (a & TPMA_OBJECT_SIGN_ENCRYPT) != 0 ||
          (a & TPMA_OBJECT_RESTRICTED) != 0)
        return Status::Corruption(what + " is not an ECDH-only P-256 key-agreement key");
      break;
  }
  std::array<unsigned char, 65> point{};
  point[0] = 0x04;
  std::memcpy(point.data() + 1 + 32 - p.unique.ecc.x.size, p.unique.ecc.x.buffer,
              p.unique.ecc.x.size);
  std::memcpy(point.data() + 33 + 32 - p.unique.ecc.y.size, p.unique.ecc.y.buffer,
              p.unique.ecc.y.size);
  char group[] = "prime256v1";
  std::array<OSSL_PARAM, 3> params = {
      OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0),
      OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()),
      OSSL_PARAM_construct_end()};
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr), EVP_PKEY_CTX_free);
  EVP_PKEY* raw_key = nullptr;
  if (!ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw_key, EVP_PKEY_PUBLIC_KEY, params.data()) != 1)
    return Status::Corruption(what + " holds no point on P-256");
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(raw_key, EVP_PKEY_free);
  unsigned char* der = nullptr;
  int n = i2d_PUBKEY(key.get(), &der);
  if (n <= 0) return Status::Internal("cannot encode the public key as SubjectPublicKeyInfo");
  Bytes spki(reinterpret_cast<std::byte*>(der), reinterpret_cast<std::byte*>(der) + n);
  OPENSSL_free(der);
  Result<PublicKey> parsed = PublicKey::from_spki_der(spki);
  if (!parsed.ok()) return parsed.status().with_context(what);
  return parsed;
}

// The TPM's reply was a format-one error about a parameter: it does not accept the blob.
bool rc_rejects_input(TSS2_RC rc) {
  TSS2_RC base = rc_base(rc);
  return base != rc_base(TPM2_RC_RETRY) && (base & TPM2_RC_FMT1) != 0 &&
         (rc & TSS2_RC_LAYER_MASK) == 0;
}

// TPM2_ECDH_ZGen's reply says the peer's point is at fault: a format-one error about a parameter
// (inPoint is its only one; TPM_RC_ECC_POINT when it is not on the curve), or TPM_RC_NO_RESULT
// (the product is the point at infinity).
bool rc_refuses_point(TSS2_RC rc) {
  if ((rc & TSS2_RC_LAYER_MASK) != 0) return false;
  if (rc_base(rc) == TPM2_RC_NO_RESULT) return true;
  return (rc & TPM2_RC_FMT1) != 0 && (rc & TPM2_RC_P) != 0;
}

}  // namespace

Tpm2KeyStore::Tpm2KeyStore(std::string tcti, std::filesystem::path key_dir,
                           std::uint32_t counter_index)
    : tcti_(std::move(tcti)),
      key_dir_(std::move(key_dir)),
      counter_index_(counter_index),
      active_tr_(ESYS_TR_NONE),
      counter_tr_(ESYS_TR_NONE) {}

Tpm2KeyStore::~Tpm2KeyStore() {
  std::lock_guard lock(mutex_);
  drop_device();
}

void Tpm2KeyStore::drop_device() {
  if (device_ && active_tr_ != ESYS_TR_NONE) device_->flush(active_tr_);
  active_tr_ = ESYS_TR_NONE;
  counter_tr_ = ESYS_TR_NONE;
  device_.reset();  // flushes the primary
}

template <typename T, typename Op>
Result<T> Tpm2KeyStore::with_device(Op&& op) {
  for (int attempt = 0;; ++attempt) {
    if (!device_) {
      Result<std::unique_ptr<Device>> device = Device::connect(tcti_);
      if (!device.ok()) {
        ++health_.errors;
        health_.last_error = device.status().message();
        health_.reachable = false;
        return device.status();
      }
      device_ = std::move(device).value();
      if (connected_before_) ++health_.reconnects;
      connected_before_ = true;
    }
    device_->clear_last_rc();
    Result<T> result = op(*device_);
    if (result.ok()) {
      health_.reachable = true;
      return result;
    }
    const TSS2_RC rc = device_->last_rc();
    if (rc == TSS2_RC_SUCCESS) return result;  // not the device: a file, an argument
    ++health_.errors;
    health_.last_error = rc_text(rc);
    const bool lost = rc_connection_lost(rc) || rc_stale_handle(rc);
    if (lost) {
      drop_device();
      health_.reachable = false;
    }
    if (attempt > 0) return result;
    if (lost) continue;  // reconnect and run once more
    if (rc_base(rc) == TPM2_RC_OBJECT_MEMORY && active_tr_ != ESYS_TR_NONE) {
      device_->flush(active_tr_);
      active_tr_ = ESYS_TR_NONE;
      continue;
    }
    return result;
  }
}

Result<std::unique_ptr<Tpm2KeyStore>> Tpm2KeyStore::open(const KeyStoreConfig& config,
                                                         KeyPolicy policy) {
  std::string_view uri = config.uri;
  if (uri.size() < 4 || (uri.size() > 4 && uri[4] != ':'))
    return Status::InvalidArgument("a TPM key store URI is tpm2 or tpm2:TCTI, not '" + config.uri +
                                   "'");
  std::string tcti = uri.size() <= 5 ? std::string(kDefaultTcti) : std::string(uri.substr(5));
  if (config.key_dir.empty())
    return Status::InvalidArgument("the TPM key store needs a key directory (key_dir)");
  for (unsigned p : config.seal_pcrs)
    if (p >= kPcrCount)
      return Status::InvalidArgument("PCR " + std::to_string(p) + " does not exist (0 to 23)");
  if (config.counter_nv_index < 0x01000000 || config.counter_nv_index > 0x01ffffff)
    return Status::InvalidArgument("counter NV index " + hex32(config.counter_nv_index) +
                                   " is not an NV index (0x01000000 to 0x01ffffff)");

  std::error_code ec;
  const std::filesystem::path dir = config.key_dir;
  if (!std::filesystem::exists(dir, ec)) {
    switch (policy) {
      case KeyPolicy::kUseExisting:
        return Status::NotFound("the TPM key directory " + dir.string() +
                                " does not exist (medctl init creates it)");
      case KeyPolicy::kCreateIfMissing:
        if (!std::filesystem::create_directories(dir, ec) && ec)
          return Status::IOError("cannot create the TPM key directory " + dir.string() + ": " +
                                 ec.message());
        ::chmod(dir.c_str(), 0700);
        break;
    }
  } else if (!std::filesystem::is_directory(dir, ec)) {
    return Status::InvalidArgument("the TPM key directory " + dir.string() + " is not a directory");
  }

  std::unique_ptr<Tpm2KeyStore> store(new Tpm2KeyStore(tcti, dir, config.counter_nv_index));
  std::lock_guard lock(store->mutex_);
  MEDGATE_RETURN_IF_ERROR(store->open_signing_keys(policy));
  MEDGATE_RETURN_IF_ERROR(store->open_agreement_key());
  MEDGATE_RETURN_IF_ERROR(store->open_tls_key());
  MEDGATE_RETURN_IF_ERROR(store->open_data_key_secret(config.seal_pcrs, policy));
  MEDGATE_RETURN_IF_ERROR(store->open_counter(policy));
  return store;
}

std::string Tpm2KeyStore::key_file(const KeyId& id, const char* extension) const {
  return (key_dir_ / ("signing-" + to_hex(id) + extension)).string();
}

// ---- signing keys ----

Status Tpm2KeyStore::open_signing_keys(KeyPolicy policy) {
  const std::filesystem::path order_path = key_dir_ / kKeyOrderFile;
  Result<Bytes> order = read_small_file(order_path, 64 * kMaxFileBytes);
  if (!order.ok() && order.status().code() == StatusCode::kNotFound) {
    switch (policy) {
      case KeyPolicy::kUseExisting:
        return Status::NotFound("no TPM signing key in " + key_dir_.string() + " (" +
                                order_path.string() + " does not exist)");
      case KeyPolicy::kCreateIfMissing: {
        MEDGATE_ASSIGN_OR_RETURN(SigningKey genesis, with_device<SigningKey>([this](Device& d) {
                                   return make_signing_key(d);
                                 }));
        MEDGATE_RETURN_IF_ERROR(write_signing_key(genesis, {genesis}));
        keys_.push_back(std::move(genesis));
        break;
      }
    }
  } else {
    if (!order.ok()) return order.status();
    std::string_view text(reinterpret_cast<const char*>(order->data()), order->size());
    int line = 0;
    while (!text.empty()) {
      ++line;
      std::size_t nl = text.find('\n');
      std::string_view item = text.substr(0, nl);
      text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
      if (item.empty()) continue;
      std::optional<Hash> id = hash_from_hex(item);
      if (!id)
        return Status::Corruption(order_path.string() + ":" + std::to_string(line) +
                                  ": not a key id (64 hex digits)");
      MEDGATE_ASSIGN_OR_RETURN(Bytes pub, read_small_file(key_file(*id, ".pub"), kMaxFileBytes));
      MEDGATE_ASSIGN_OR_RETURN(Bytes priv, read_small_file(key_file(*id, ".priv"), kMaxFileBytes));
      MEDGATE_ASSIGN_OR_RETURN(TPM2B_PUBLIC area, unmarshal_public(pub, key_file(*id, ".pub")));
      MEDGATE_RETURN_IF_ERROR(unmarshal_private(priv, key_file(*id, ".priv")).status());
      MEDGATE_ASSIGN_OR_RETURN(PublicKey key,
                               public_key_of(area, key_file(*id, ".pub"), KeyUse::kSign));
      if (key.id() != *id)
        return Status::Corruption(key_file(*id, ".pub") + " holds key " + to_hex(key.id()) +
                                  ", not the key its name says");
      keys_.push_back(SigningKey{std::move(key), std::move(pub), std::move(priv)});
    }
    if (keys_.empty()) return Status::Corruption(order_path.string() + " lists no signing key");
  }

  // Load every key once, so a blob this TPM does not accept is reported now, not at the first
  // signature; the genesis key stays loaded as the active one.
  return with_device<bool>([this](Device& d) -> Result<bool> {
           MEDGATE_ASSIGN_OR_RETURN(ESYS_TR active, active_handle(d));
           (void)active;
           for (std::size_t i = 1; i < keys_.size(); ++i) {
             FlushGuard guard(d);
             MEDGATE_ASSIGN_OR_RETURN(*guard.out(),
                                      load(d, keys_[i].public_blob, keys_[i].private_blob,
                                           key_file(keys_[i].public_key.id(), ".priv")));
           }
           return true;
         })
      .status();
}

namespace {

struct CreatedKey {
  PublicKey public_key;
  Bytes public_blob;
  Bytes private_blob;
};

// A new key from `in_public` under the storage primary: its public key and both blobs. `what`
// names it in messages ("signing key").
Result<CreatedKey> create_key(Device& d, const TPM2B_PUBLIC& in_public, const std::string& what,
                              KeyUse use) {
  const TPM2B_SENSITIVE_CREATE in_sensitive{};
  const TPM2B_DATA outside_info{};
  const TPML_PCR_SELECTION creation_pcrs{};
  TPM2B_PRIVATE* out_private = nullptr;
  TPM2B_PUBLIC* out_public = nullptr;
  TSS2_RC rc = d.call([&] {
    return Esys_Create(d.esys(), d.primary(), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                       &in_sensitive, &in_public, &outside_info, &creation_pcrs, &out_private,
                       &out_public, nullptr, nullptr, nullptr);
  });
  EsysPtr<TPM2B_PRIVATE> own_private(out_private);
  EsysPtr<TPM2B_PUBLIC> own_public(out_public);
  if (rc != TSS2_RC_SUCCESS) return d.fail("creating a " + what, rc);
  MEDGATE_ASSIGN_OR_RETURN(PublicKey key, public_key_of(*out_public, "the new " + what, use));
  MEDGATE_ASSIGN_OR_RETURN(Bytes pub, marshal_public(*out_public));
  MEDGATE_ASSIGN_OR_RETURN(Bytes priv, marshal_private(*out_private));
  return CreatedKey{std::move(key), std::move(pub), std::move(priv)};
}

}  // namespace

Result<Tpm2KeyStore::SigningKey> Tpm2KeyStore::make_signing_key(Device& d) {
  MEDGATE_ASSIGN_OR_RETURN(CreatedKey k,
                           create_key(d, signing_key_template(), "signing key", KeyUse::kSign));
  return SigningKey{std::move(k.public_key), std::move(k.public_blob), std::move(k.private_blob)};
}

// The blobs first, then the list that makes the key part of the store: a crash in between leaves
// unlisted files, which are harmless.
Status Tpm2KeyStore::write_signing_key(const SigningKey& key, const std::vector<SigningKey>& all) {
  MEDGATE_RETURN_IF_ERROR(
      write_file_atomically(key_file(key.public_key.id(), ".priv"), key.private_blob));
  MEDGATE_RETURN_IF_ERROR(
      write_file_atomically(key_file(key.public_key.id(), ".pub"), key.public_blob));
  std::string order;
  for (const SigningKey& k : all) order += to_hex(k.public_key.id()) + "\n";
  return write_file_atomically(key_dir_ / kKeyOrderFile, as_bytes(order));
}

Result<std::uint32_t> Tpm2KeyStore::load(Device& d, ByteView public_blob, ByteView private_blob,
                                         const std::string& what) {
  MEDGATE_ASSIGN_OR_RETURN(TPM2B_PUBLIC in_public, unmarshal_public(public_blob, what));
  MEDGATE_ASSIGN_OR_RETURN(TPM2B_PRIVATE in_private, unmarshal_private(private_blob, what));
  ESYS_TR handle = ESYS_TR_NONE;
  TSS2_RC rc = d.call([&] {
    return Esys_Load(d.esys(), d.primary(), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                     &in_private, &in_public, &handle);
  });
  if (rc != TSS2_RC_SUCCESS) {
    if (rc_rejects_input(rc)) {
      d.note_rc(rc);
      return Status::Corruption("the TPM at " + d.tcti() + " does not accept " + what +
                                " (damaged, or made by another TPM): " + rc_text(rc));
    }
    return d.fail("loading " + what, rc);
  }
  return handle;
}

Result<std::uint32_t> Tpm2KeyStore::active_handle(Device& d) {
  if (active_tr_ != ESYS_TR_NONE) return active_tr_;
  const SigningKey& key = keys_[active_];
  MEDGATE_ASSIGN_OR_RETURN(active_tr_, load(d, key.public_blob, key.private_blob,
                                            key_file(key.public_key.id(), ".priv")));
  return active_tr_;
}

Result<Bytes> Tpm2KeyStore::sign_with(Device& d, std::size_t index, const Hash& digest) {
  FlushGuard other(d);
  ESYS_TR key = ESYS_TR_NONE;
  const SigningKey& signing = keys_[index];
  if (index == active_) {
    MEDGATE_ASSIGN_OR_RETURN(key, active_handle(d));
  } else {
    MEDGATE_ASSIGN_OR_RETURN(*other.out(), load(d, signing.public_blob, signing.private_blob,
                                                key_file(signing.public_key.id(), ".priv")));
    key = other.get();
  }
  return sign_loaded(d, key, "key " + short_id(signing.public_key.id()), digest);
}

Result<Bytes> Tpm2KeyStore::sign_loaded(Device& d, ESYS_TR key, const std::string& name,
                                        const Hash& digest) {
  TPM2B_DIGEST in_digest{};
  in_digest.size = static_cast<UINT16>(digest.size());
  std::memcpy(in_digest.buffer, digest.data(), digest.size());
  TPMT_SIG_SCHEME scheme{};
  scheme.scheme = TPM2_ALG_ECDSA;
  scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA256;
  // The digest was computed outside the TPM: a NULL hash-check ticket (allowed for a key that is
  // not restricted).
  TPMT_TK_HASHCHECK validation{};
  validation.tag = TPM2_ST_HASHCHECK;
  validation.hierarchy = TPM2_RH_NULL;
  TPMT_SIGNATURE* signature = nullptr;
  TSS2_RC rc = d.call([&] {
    return Esys_Sign(d.esys(), key, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &in_digest,
                     &scheme, &validation, &signature);
  });
  EsysPtr<TPMT_SIGNATURE> own(signature);
  if (rc != TSS2_RC_SUCCESS) return d.fail("signing with " + name, rc);
  const TPMS_SIGNATURE_ECC& ecdsa = signature->signature.ecdsa;
  if (signature->sigAlg != TPM2_ALG_ECDSA || ecdsa.signatureR.size > 32 ||
      ecdsa.signatureS.size > 32)
    return Status::Unavailable("the TPM at " + tcti_ +
                               " returned a signature that is not ECDSA P-256");
  std::array<std::byte, 64> raw{};
  std::memcpy(raw.data() + 32 - ecdsa.signatureR.size, ecdsa.signatureR.buffer,
              ecdsa.signatureR.size);
  std::memcpy(raw.data() + 64 - ecdsa.signatureS.size, ecdsa.signatureS.buffer,
              ecdsa.signatureS.size);
  return ecdsa_raw_to_der(raw);
}

Result<Bytes> Tpm2KeyStore::sign_digest(const Hash& digest) {
  std::lock_guard lock(mutex_);
  return with_device<Bytes>([&](Device& d) { return sign_with(d, active_, digest); });
}

Result<Bytes> Tpm2KeyStore::sign_digest_with(const KeyId& key, const Hash& digest) {
  std::lock_guard lock(mutex_);
  auto it = std::find_if(keys_.begin(), keys_.end(),
                         [&](const SigningKey& k) { return k.public_key.id() == key; });
  if (it == keys_.end())
    return Status::NotFound("the TPM key store holds no signing key " + to_hex(key));
  const auto index = static_cast<std::size_t>(it - keys_.begin());
  return with_device<Bytes>([&](Device& d) { return sign_with(d, index, digest); });
}

PublicKey Tpm2KeyStore::signing_key() const {
  std::lock_guard lock(mutex_);
  return keys_[active_].public_key;
}

std::vector<PublicKey> Tpm2KeyStore::signing_keys() const {
  std::lock_guard lock(mutex_);
  std::vector<PublicKey> out;
  for (const SigningKey& k : keys_) out.push_back(k.public_key);
  return out;
}

Status Tpm2KeyStore::use_signing_key(const KeyId& key) {
  std::lock_guard lock(mutex_);
  auto it = std::find_if(keys_.begin(), keys_.end(),
                         [&](const SigningKey& k) { return k.public_key.id() == key; });
  if (it == keys_.end())
    return Status::NotFound("the TPM key store holds no signing key " + to_hex(key));
  const auto index = static_cast<std::size_t>(it - keys_.begin());
  if (index == active_) return Status::Ok();
  if (device_ && active_tr_ != ESYS_TR_NONE) device_->flush(active_tr_);
  active_tr_ = ESYS_TR_NONE;  // the new one is loaded at its first signature
  active_ = index;
  return Status::Ok();
}

Result<PublicKey> Tpm2KeyStore::create_signing_key() {
  std::lock_guard lock(mutex_);
  MEDGATE_ASSIGN_OR_RETURN(
      SigningKey key, with_device<SigningKey>([this](Device& d) { return make_signing_key(d); }));
  std::vector<SigningKey> all = keys_;
  all.push_back(key);
  MEDGATE_RETURN_IF_ERROR(write_signing_key(key, all));
  keys_ = std::move(all);
  return key.public_key;
}

// ---- the data-key secret ----

Status Tpm2KeyStore::open_data_key_secret(const std::vector<unsigned>& seal_pcrs,
                                          KeyPolicy policy) {
  const std::filesystem::path pub_path = key_dir_ / kSecretPublic;
  const std::filesystem::path priv_path = key_dir_ / kSecretPrivate;
  const std::filesystem::path pcrs_path = key_dir_ / kSecretPcrs;
  Result<Bytes> pub = read_small_file(pub_path, kMaxFileBytes);
  if (!pub.ok() && pub.status().code() == StatusCode::kNotFound) {
    switch (policy) {
      case KeyPolicy::kUseExisting:
        return Status::NotFound("no sealed data-key secret in " + key_dir_.string() + " (" +
                                pub_path.string() + " does not exist)");
      case KeyPolicy::kCreateIfMissing:
        break;
    }
    // Seal 64 random bytes from the TPM, to the PCRs' current values when PCRs are given.
    Result<bool> sealed = with_device<bool>([&](Device& d) -> Result<bool> {
      TPM2B_DIGEST policy_digest{};
      if (!seal_pcrs.empty()) {
        FlushGuard trial(d);
        TPMT_SYM_DEF symmetric{};
        symmetric.algorithm = TPM2_ALG_NULL;
        TSS2_RC rc = d.call([&] {
          return Esys_StartAuthSession(d.esys(), ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                       ESYS_TR_NONE, ESYS_TR_NONE, nullptr, TPM2_SE_TRIAL,
                                       &symmetric, TPM2_ALG_SHA256, trial.out());
        });
        if (rc != TSS2_RC_SUCCESS) return d.fail("starting a trial policy session", rc);
        const TPM2B_DIGEST current{};
        const TPML_PCR_SELECTION selection = pcr_selection(seal_pcrs);
        rc = d.call([&] {
          return Esys_PolicyPCR(d.esys(), trial.get(), ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                &current, &selection);
        });
        if (rc != TSS2_RC_SUCCESS) return d.fail("TPM2_PolicyPCR", rc);
        TPM2B_DIGEST* digest = nullptr;
        rc = d.call([&] {
          return Esys_PolicyGetDigest(d.esys(), trial.get(), ESYS_TR_NONE, ESYS_TR_NONE,
                                      ESYS_TR_NONE, &digest);
        });
        EsysPtr<TPM2B_DIGEST> own(digest);
        if (rc != TSS2_RC_SUCCESS) return d.fail("TPM2_PolicyGetDigest", rc);
        policy_digest = *digest;
      }
      MEDGATE_ASSIGN_OR_RETURN(Bytes secret, random_from(d, kSecretBytes));
      TPM2B_SENSITIVE_CREATE sensitive{};
      sensitive.sensitive.data.size = static_cast<UINT16>(secret.size());
      std::memcpy(sensitive.sensitive.data.buffer, secret.data(), secret.size());
      secure_wipe(secret);
      TPM2B_PUBLIC in_public{};
      TPMT_PUBLIC& p = in_public.publicArea;
      p.type = TPM2_ALG_KEYEDHASH;
      p.nameAlg = TPM2_ALG_SHA256;
      // No userWithAuth under a PCR policy: only the policy can release it.
      p.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_NODA |
                           (seal_pcrs.empty() ? TPMA_OBJECT_USERWITHAUTH : 0);
      p.authPolicy = policy_digest;
      p.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG_NULL;
      const TPM2B_DATA outside_info{};
      const TPML_PCR_SELECTION creation_pcrs{};
      TPM2B_PRIVATE* out_private = nullptr;
      TPM2B_PUBLIC* out_public = nullptr;
      TSS2_RC rc = d.call([&] {
        return Esys_Create(d.esys(), d.primary(), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                           &sensitive, &in_public, &outside_info, &creation_pcrs, &out_private,
                           &out_public, nullptr, nullptr, nullptr);
      });
      secure_wipe(std::as_writable_bytes(std::span(sensitive.sensitive.data.buffer)));
      EsysPtr<TPM2B_PRIVATE> own_private(out_private);
      EsysPtr<TPM2B_PUBLIC> own_public(out_public);
      if (rc != TSS2_RC_SUCCESS) return d.fail("sealing the data-key secret", rc);
      MEDGATE_ASSIGN_OR_RETURN(Bytes pub_blob, marshal_public(*out_public));
      MEDGATE_ASSIGN_OR_RETURN(Bytes priv_blob, marshal_private(*out_private));
      // The public part last: its presence says the secret exists.
      MEDGATE_RETURN_IF_ERROR(write_file_atomically(pcrs_path, as_bytes(pcr_list(seal_pcrs))));
      MEDGATE_RETURN_IF_ERROR(write_file_atomically(priv_path, priv_blob));
      MEDGATE_RETURN_IF_ERROR(write_file_atomically(pub_path, pub_blob));
      return true;
    });
    if (!sealed.ok()) return sealed.status();
    pub = read_small_file(pub_path, kMaxFileBytes);
  }
  if (!pub.ok()) return pub.status();
  MEDGATE_ASSIGN_OR_RETURN(Bytes priv, read_small_file(priv_path, kMaxFileBytes));
  MEDGATE_ASSIGN_OR_RETURN(Bytes pcrs_text, read_small_file(pcrs_path, kMaxFileBytes));
  MEDGATE_ASSIGN_OR_RETURN(std::vector<unsigned> pcrs,
                           parse_pcr_list(to_string(pcrs_text), pcrs_path.string()));

  // Unseal once; only the derived keys stay, in memory.
  MEDGATE_ASSIGN_OR_RETURN(
      DerivedKeys keys, with_device<DerivedKeys>([&](Device& d) -> Result<DerivedKeys> {
        FlushGuard sealed(d);
        MEDGATE_ASSIGN_OR_RETURN(
            *sealed.out(), load(d, *pub, priv, "the sealed data-key secret " + priv_path.string()));
        FlushGuard session(d);
        ESYS_TR auth = ESYS_TR_PASSWORD;
        if (!pcrs.empty()) {
          TPMT_SYM_DEF symmetric{};
          symmetric.algorithm = TPM2_ALG_NULL;
          TSS2_RC rc = d.call([&] {
            return Esys_StartAuthSession(d.esys(), ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                         ESYS_TR_NONE, ESYS_TR_NONE, nullptr, TPM2_SE_POLICY,
                                         &symmetric, TPM2_ALG_SHA256, session.out());
          });
          if (rc != TSS2_RC_SUCCESS) return d.fail("starting a policy session", rc);
          // Kept open after the command so that the guard, not the TPM, ends it on every path.
          Esys_TRSess_SetAttributes(d.esys(), session.get(), TPMA_SESSION_CONTINUESESSION,
                                    TPMA_SESSION_CONTINUESESSION);
          const TPM2B_DIGEST current{};
          const TPML_PCR_SELECTION selection = pcr_selection(pcrs);
          rc = d.call([&] {
            return Esys_PolicyPCR(d.esys(), session.get(), ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                  &current, &selection);
          });
          if (rc != TSS2_RC_SUCCESS) return d.fail("TPM2_PolicyPCR", rc);
          auth = session.get();
        }
        TPM2B_SENSITIVE_DATA* secret = nullptr;
        TSS2_RC rc = d.call([&] {
          return Esys_Unseal(d.esys(), sealed.get(), auth, ESYS_TR_NONE, ESYS_TR_NONE, &secret);
        });
        EsysPtr<TPM2B_SENSITIVE_DATA> own(secret);
        if (rc != TSS2_RC_SUCCESS) {
          if (rc_base(rc) == TPM2_RC_POLICY_FAIL && !pcrs.empty()) {
            d.note_rc(rc);
            const bool one = pcrs.size() == 1;
            return Status::FailedPrecondition(
                "the TPM refused to unseal the data-key secret: " +
                std::string(one ? "PCR " : "PCRs ") + pcr_list(pcrs) +
                (one ? " no longer matches the value it was sealed to"
                     : " no longer match the values they were sealed to") +
                " (TPM_RC_POLICY_FAIL) — the boot state changed");
          }
          return d.fail("unsealing the data-key secret", rc);
        }
        std::span<std::byte> bytes = std::as_writable_bytes(std::span(secret->buffer));
        Result<DerivedKeys> derived = DerivedKeys::derive(bytes.first(secret->size));
        secure_wipe(bytes);
        return derived;
      }));
  derived_.emplace(std::move(keys));
  return Status::Ok();
}

Result<Bytes> Tpm2KeyStore::wrap_key(ByteView key, ByteView context) {
  return derived_->wrap(key, context);
}

Result<SecretBytes> Tpm2KeyStore::unwrap_key(ByteView wrapped, ByteView context) {
  return derived_->unwrap(wrapped, context);
}

Result<Hash> Tpm2KeyStore::keyed_hash(ByteView message) {
  return derived_->keyed_hash(message);
}

// ---- the key-agreement key ----

// Read at open when it exists and loaded once, like the signing keys, so that damage is reported
// at start and not when a replica first needs it. A missing public file means no key: the
// private file is written first, so a crash between the two leaves a stray .priv that the next
// key made overwrites.
Status Tpm2KeyStore::open_agreement_key() {
  MEDGATE_ASSIGN_OR_RETURN(agreement_, read_optional_key(kAgreementPublic, kAgreementPrivate,
                                                         "the key-agreement key", KeyUse::kAgree));
  return Status::Ok();
}

Result<std::optional<Tpm2KeyStore::KeyBlobs>> Tpm2KeyStore::read_optional_key(
    std::string_view public_name, std::string_view private_name, const std::string& what,
    KeyUse use) {
  const std::filesystem::path pub_path = key_dir_ / public_name;
  const std::filesystem::path priv_path = key_dir_ / private_name;
  Result<Bytes> pub = read_small_file(pub_path, kMaxFileBytes);
  if (!pub.ok() && pub.status().code() == StatusCode::kNotFound) return std::optional<KeyBlobs>();
  if (!pub.ok()) return pub.status();
  Result<Bytes> priv = read_small_file(priv_path, kMaxFileBytes);
  if (!priv.ok() && priv.status().code() == StatusCode::kNotFound)
    return Status::Corruption(what + " is damaged: " + pub_path.string() + " exists but " +
                              priv_path.string() + " does not");
  if (!priv.ok()) return priv.status();
  MEDGATE_ASSIGN_OR_RETURN(TPM2B_PUBLIC area, unmarshal_public(*pub, pub_path.string()));
  MEDGATE_RETURN_IF_ERROR(unmarshal_private(*priv, priv_path.string()).status());
  MEDGATE_ASSIGN_OR_RETURN(PublicKey key, public_key_of(area, pub_path.string(), use));
  KeyBlobs blobs{std::move(key), std::move(pub).value(), std::move(priv).value()};
  MEDGATE_RETURN_IF_ERROR(with_device<bool>([&](Device& d) -> Result<bool> {
                            FlushGuard guard(d);
                            MEDGATE_ASSIGN_OR_RETURN(
                                *guard.out(),
                                load(d, blobs.public_blob, blobs.private_blob, priv_path.string()));
                            return true;
                          }).status());
  return std::optional<KeyBlobs>(std::move(blobs));
}

Result<Tpm2KeyStore::KeyBlobs> Tpm2KeyStore::make_agreement_key(Device& d) {
  MEDGATE_ASSIGN_OR_RETURN(
      CreatedKey k, create_key(d, agreement_key_template(), "key-agreement key", KeyUse::kAgree));
  return KeyBlobs{std::move(k.public_key), std::move(k.public_blob), std::move(k.private_blob)};
}

Status Tpm2KeyStore::ensure_agreement_key() {
  if (agreement_) return Status::Ok();
  MEDGATE_ASSIGN_OR_RETURN(
      KeyBlobs key, with_device<KeyBlobs>([this](Device& d) { return make_agreement_key(d); }));
  // The public part last: its presence says the key exists. A key whose files could not be
  // written is not kept, so no secret is ever sealed to a key a restart would lose.
  MEDGATE_RETURN_IF_ERROR(write_file_atomically(key_dir_ / kAgreementPrivate, key.private_blob));
  MEDGATE_RETURN_IF_ERROR(write_file_atomically(key_dir_ / kAgreementPublic, key.public_blob));
  agreement_ = std::move(key);
  return Status::Ok();
}

Result<PublicKey> Tpm2KeyStore::agreement_key() {
  std::lock_guard lock(mutex_);
  MEDGATE_RETURN_IF_ERROR(ensure_agreement_key());
  return agreement_->public_key;
}

Result<SecretBytes> Tpm2KeyStore::agree(const PublicKey& peer) {
  return agree_with_point(peer.uncompressed_point(), "the peer key " + short_id(peer.id()));
}

Result<SecretBytes> Tpm2KeyStore::agree_with_point(ByteView point, const std::string& peer) {
  if (point.size() != 1 + 2 * kP256Bytes || point[0] != std::byte{0x04})
    return Status::InvalidArgument(
        peer + " is not an uncompressed P-256 point (65 bytes: 0x04 || x || y); it has " +
        std::to_string(point.size()) + " bytes" +
        (point.empty() ? "" : ", the first " + to_hex(point.first(1))));
  TPM2B_ECC_POINT in_point{};
  in_point.point.x.size = kP256Bytes;
  in_point.point.y.size = kP256Bytes;
  std::memcpy(in_point.point.x.buffer, point.data() + 1, kP256Bytes);
  std::memcpy(in_point.point.y.buffer, point.data() + 1 + kP256Bytes, kP256Bytes);

  std::lock_guard lock(mutex_);
  MEDGATE_RETURN_IF_ERROR(ensure_agreement_key());
  const std::string what = (key_dir_ / kAgreementPrivate).string();
  return with_device<SecretBytes>([&](Device& d) -> Result<SecretBytes> {
    FlushGuard key(d);
    MEDGATE_ASSIGN_OR_RETURN(*key.out(),
                             load(d, agreement_->public_blob, agreement_->private_blob, what));
    TPM2B_ECC_POINT* out_point = nullptr;
    TSS2_RC rc = d.call([&] {
      return Esys_ECDH_ZGen(d.esys(), key.get(), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                            &in_point, &out_point);
    });
    EsysSecretPtr<TPM2B_ECC_POINT> z_point(out_point);
    if (rc != TSS2_RC_SUCCESS) {
      // Not a device fault: not counted in health(), and no reconnect.
      if (rc_refuses_point(rc))
        return Status::InvalidArgument("the TPM at " + tcti_ + " refuses " + peer +
                                       " as a point on P-256: " + rc_text(rc));
      return d.fail("key agreement (TPM2_ECDH_ZGen)", rc);
    }
    const TPM2B_ECC_PARAMETER& x = z_point->point.x;
    if (x.size == 0 || x.size > kP256Bytes)
      return Status::Unavailable("TPM2_ECDH_ZGen on the TPM at " + tcti_ + " returned a " +
                                 std::to_string(x.size) + "-byte x-coordinate");
    // Z is the x-coordinate as a 32-byte big-endian number; a TPM may drop leading zeros.
    Bytes z(kP256Bytes);
    std::memcpy(z.data() + kP256Bytes - x.size, x.buffer, x.size);
    return SecretBytes(std::move(z));
  });
}

// ---- the TLS key (hsm/tls_key.h) ----

// Read and loaded once at open when it exists, like the other keys.
Status Tpm2KeyStore::open_tls_key() {
  MEDGATE_ASSIGN_OR_RETURN(
      tls_, read_optional_key(kTlsPublic, kTlsPrivate, "the TLS key", KeyUse::kSign));
  return Status::Ok();
}

Result<TlsKeyInfo> Tpm2KeyStore::tls_key(bool create) {
  std::lock_guard lock(mutex_);
  const std::string location = "tpm2:" + tcti_ + " " + (key_dir_ / kTlsPublic).string();
  if (tls_) return TlsKeyInfo{tls_->public_key, false, location};
  if (!create)
    return Status::NotFound("there is no TLS key in the TPM key store (" +
                            (key_dir_ / kTlsPublic).string() +
                            " does not exist); run `medgated tls-key` first");
  // The signing keys' template: an ECDSA P-256 key that only signs and never leaves the TPM.
  MEDGATE_ASSIGN_OR_RETURN(
      KeyBlobs key, with_device<KeyBlobs>([this](Device& d) { return make_signing_key(d); }));
  MEDGATE_RETURN_IF_ERROR(write_file_atomically(key_dir_ / kTlsPrivate, key.private_blob));
  MEDGATE_RETURN_IF_ERROR(write_file_atomically(key_dir_ / kTlsPublic, key.public_blob));
  tls_ = std::move(key);
  return TlsKeyInfo{tls_->public_key, true, location};
}

Result<Bytes> Tpm2KeyStore::sign_tls_digest(const Hash& digest) {
  std::lock_guard lock(mutex_);
  if (!tls_)
    return Status::NotFound("there is no TLS key in the TPM key store; run `medgated tls-key`");
  const std::string what = (key_dir_ / kTlsPrivate).string();
  return with_device<Bytes>([&](Device& d) -> Result<Bytes> {
    FlushGuard key(d);
    MEDGATE_ASSIGN_OR_RETURN(*key.out(), load(d, tls_->public_blob, tls_->private_blob, what));
    return sign_loaded(d, key.get(), "the TLS key", digest);
  });
}

// ---- the counter ----

Result<std::uint32_t> Tpm2KeyStore::counter_handle(Device& d) {
  if (counter_tr_ != ESYS_TR_NONE) return counter_tr_;
  ESYS_TR nv = ESYS_TR_NONE;
  TSS2_RC rc = d.call([&] {
    return Esys_TR_FromTPMPublic(d.esys(), counter_index_, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                 &nv);
  });
  if (rc != TSS2_RC_SUCCESS) {
    if (rc_base(rc) == TPM2_RC_HANDLE)
      return Status::NotFound("the TPM at " + tcti_ + " has no NV index " + hex32(counter_index_) +
                              " (the rollback counter)");
    return d.fail("looking up NV index " + hex32(counter_index_), rc);
  }
  counter_tr_ = nv;
  return nv;
}

Result<std::uint64_t> Tpm2KeyStore::read_counter_from(Device& d, std::uint32_t nv) {
  TPM2B_MAX_NV_BUFFER* data = nullptr;
  TSS2_RC rc = d.call([&] {
    return Esys_NV_Read(d.esys(), ESYS_TR_RH_OWNER, nv, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                        ESYS_TR_NONE, 8, 0, &data);
  });
  EsysPtr<TPM2B_MAX_NV_BUFFER> own(data);
  if (rc != TSS2_RC_SUCCESS)
    return d.fail("reading the counter at NV index " + hex32(counter_index_), rc);
  if (data->size != 8)
    return Status::Unavailable("the counter at NV index " + hex32(counter_index_) + " returned " +
                               std::to_string(data->size) + " bytes, not 8");
  std::uint64_t value = 0;
  for (std::size_t i = 0; i < 8; ++i) value = value << 8 | data->buffer[i];
  return value;
}

Status Tpm2KeyStore::open_counter(KeyPolicy policy) {
  return with_device<bool>([&](Device& d) -> Result<bool> {
           Result<std::uint32_t> found = counter_handle(d);
           bool increment = false;
           if (!found.ok()) {
             if (found.status().code() != StatusCode::kNotFound ||
                 policy == KeyPolicy::kUseExisting)
               return found.status();
             TPM2B_NV_PUBLIC info{};
             info.nvPublic.nvIndex = counter_index_;
             info.nvPublic.nameAlg = TPM2_ALG_SHA256;
             info.nvPublic.attributes = kCounterAttributes;
             info.nvPublic.dataSize = 8;
             const TPM2B_AUTH auth{};
             ESYS_TR nv = ESYS_TR_NONE;
             TSS2_RC rc = d.call([&] {
               return Esys_NV_DefineSpace(d.esys(), ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD,
                                          ESYS_TR_NONE, ESYS_TR_NONE, &auth, &info, &nv);
             });
             if (rc != TSS2_RC_SUCCESS)
               return d.fail("defining the counter at NV index " + hex32(counter_index_), rc);
             counter_tr_ = nv;
             increment = true;
           } else {
             TPM2B_NV_PUBLIC* info = nullptr;
             TSS2_RC rc = d.call([&] {
               return Esys_NV_ReadPublic(d.esys(), *found, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                         &info, nullptr);
             });
             EsysPtr<TPM2B_NV_PUBLIC> own(info);
             if (rc != TSS2_RC_SUCCESS)
               return d.fail("reading the attributes of NV index " + hex32(counter_index_), rc);
             const TPMA_NV attributes = info->nvPublic.attributes;
             if ((attributes & ~kCounterStateAttributes) != kCounterAttributes ||
                 info->nvPublic.dataSize != 8)
               return Status::FailedPrecondition(
                   "NV index " + hex32(counter_index_) + " on the TPM at " + tcti_ +
                   " exists but is not a medgate rollback counter (attributes " +
                   hex32(attributes) + ", wanted a counter with owner read/write and no DA, " +
                   hex32(kCounterAttributes) + "); choose another counter_nv_index");
             if ((attributes & TPMA_NV_WRITTEN) == 0) {
               if (policy == KeyPolicy::kUseExisting)
                 return Status::FailedPrecondition("the counter at NV index " +
                                                   hex32(counter_index_) +
                                                   " was defined but never incremented");
               increment = true;
             }
           }
           if (increment) {
             TSS2_RC rc = d.call([&] {
               return Esys_NV_Increment(d.esys(), ESYS_TR_RH_OWNER, counter_tr_, ESYS_TR_PASSWORD,
                                        ESYS_TR_NONE, ESYS_TR_NONE);
             });
             if (rc != TSS2_RC_SUCCESS)
               return d.fail("incrementing the counter at NV index " + hex32(counter_index_), rc);
           }
           return true;
         })
      .status();
}

Result<std::uint64_t> Tpm2KeyStore::read_counter() {
  std::lock_guard lock(mutex_);
  return with_device<std::uint64_t>([&](Device& d) -> Result<std::uint64_t> {
    MEDGATE_ASSIGN_OR_RETURN(ESYS_TR nv, counter_handle(d));
    return read_counter_from(d, nv);
  });
}

Result<std::uint64_t> Tpm2KeyStore::increment_counter() {
  std::lock_guard lock(mutex_);
  return with_device<std::uint64_t>([&](Device& d) -> Result<std::uint64_t> {
    MEDGATE_ASSIGN_OR_RETURN(ESYS_TR nv, counter_handle(d));
    TSS2_RC rc = d.call([&] {
      return Esys_NV_Increment(d.esys(), ESYS_TR_RH_OWNER, nv, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                               ESYS_TR_NONE);
    });
    if (rc != TSS2_RC_SUCCESS)
      return d.fail("incrementing the counter at NV index " + hex32(counter_index_), rc);
    return read_counter_from(d, nv);
  });
}

// ---- misc ----

Result<Bytes> Tpm2KeyStore::random_from(Device& d, std::size_t n) {
  Bytes out;
  out.reserve(n);
  while (out.size() < n) {
    const auto want = static_cast<UINT16>(std::min<std::size_t>(n - out.size(), 32));
    TPM2B_DIGEST* chunk = nullptr;
    TSS2_RC rc = d.call([&] {
      return Esys_GetRandom(d.esys(), ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, want, &chunk);
    });
    EsysPtr<TPM2B_DIGEST> own(chunk);
    if (rc != TSS2_RC_SUCCESS) return d.fail("TPM2_GetRandom", rc);
    if (chunk->size == 0 || chunk->size > want)
      return Status::Unavailable("TPM2_GetRandom on the TPM at " + tcti_ + " returned " +
                                 std::to_string(chunk->size) + " bytes for " +
                                 std::to_string(want));
    const auto* bytes = reinterpret_cast<const std::byte*>(chunk->buffer);
    out.insert(out.end(), bytes, bytes + chunk->size);
  }
  return out;
}

Result<Bytes> Tpm2KeyStore::random(std::size_t n) {
  if (n > kMaxRandomBytes)
    return Status::InvalidArgument("at most " + std::to_string(kMaxRandomBytes) +
                                   " random bytes per call from the TPM");
  std::lock_guard lock(mutex_);
  return with_device<Bytes>([&](Device& d) { return random_from(d, n); });
}

KeyStoreHealth Tpm2KeyStore::health() const {
  std::lock_guard lock(mutex_);
  return health_;
}

}  // namespace medgate::hsm::tpm2
