// bench_keys: what key custody costs, per key-store backend, each number printed beside an
// in-process OpenSSL baseline measured in the same run. A benchmark, not a test: nothing here
// judges a time; `--smoke` (a ctest) runs every phase once with tiny counts so that the benchmark
// cannot rot.
//
// For each backend of key_store_backends() (a real SoftHSM token, a real swtpm), brought up by
// TestKeyStore in a scratch directory:
//   1. Signing: KeyStore::sign_digest (ECDSA P-256) signs/s and p50/p99 at 1 thread, and for
//      SoftHSM at 2 threads (one store, whose one session is serialized, and a store per thread);
//      baseline: EVP_PKEY_sign with a P-256 key in process memory, the same digests.
//   2. wrap_key / unwrap_key of a 32-byte key and keyed_hash, calls/s; KeyStore::agree (ECDH
//      P-256 with the store's agreement key, how a member opens a sealed box) beside
//      EVP_PKEY_derive with a software key.
//   3. The vault: encrypt/decrypt MB/s at 64 B, 1 KiB and 64 KiB for one patient whose key is
//      cached, beside bare AES-256-GCM; and pseudonym() of never-seen identifiers (RNG + wrap +
//      a durable SQLite insert) per second, beside the disk's 4 KiB write + fdatasync.
//   4. Ledger appends at 1 and 8 threads of an observation-sized admin-action entry carrying a
//      200-byte payload in clear ("off") or vault-encrypted first ("on"), side by side.
//
// Rows that are compared take turns in ~0.25 s slices (interleaved()): on a shared machine, and on
// a disk whose fsync time changes by 10x for seconds at a time, back-to-back rows would compare
// the machine's moods rather than the code.
//
// One SoftHSM configuration per process at a time (tests/support/softhsm.h): every key store of
// one TestKeyStore is closed before the next backend is brought up.
//
// Run a Release (RelWithDebInfo) build; `bench_keys --help` lists the flags.
#include <fcntl.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "appliance/vault.h"
#include "hsm/key_store.h"
#include "hsm/key_store_factory.h"
#include "hsm/public_key.h"
#include "ledger/entry.h"
#include "ledger/store.h"
#include "tests/bench/bench_util.h"
#include "tests/support/key_stores.h"
#include "tests/support/temp_dir.h"

namespace medgate::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr std::size_t kDigests = 256;       // distinct digests signed in turn
constexpr std::size_t kDataKeyBytes = 32;   // a vault data key (AES-256)
constexpr std::size_t kPayloadBytes = 200;  // an observation's payload in the ledger phase
constexpr std::size_t kVaultSizes[] = {64, 1024, 64 * 1024};
constexpr int kLedgerThreads[] = {1, 8};
constexpr std::chrono::milliseconds kHeadInterval{1000};  // as in production
constexpr std::string_view kAad = "medgate bench observation";
constexpr double kSliceSeconds = 0.25;  // one turn of a row among the rows it is compared with

constexpr std::string_view kUsage = R"(usage: bench_keys [flags]

Prints, per key-store backend (SoftHSM, swtpm), ECDSA P-256 signs/s through the KeyStore,
wrap/unwrap/keyed_hash calls/s, the vault's encrypt/decrypt MB/s and new-patient rate, and the
ledger's append rate with payload encryption off and on; each beside an in-process OpenSSL
baseline (or the unencrypted run) measured in the same run.

  --seconds S                 seconds per measured row (default 3; fractions allowed). Rows
                              that are compared (a backend and its baseline, encryption off and
                              on) take turns in slices of about 0.25 s, so that load on a shared
                              machine, or a disk whose fsync time changes, falls on both alike
  --only sign|vault|ledger    run one phase (sign also covers wrap/unwrap/keyed_hash)
  --backend softhsm|tpm2      run one backend
  --dir PATH                  where the token, swtpm state, vaults and ledgers go (default
                              /var/tmp, since /tmp may be tmpfs); a scratch directory is made
                              under it and removed at the end
  --smoke                     every phase once with tiny counts, in seconds (the ctest)
  --help                      this text
)";

// ---- command line ----

enum class Only { kAll, kSign, kVault, kLedger };

struct Options {
  double seconds = 3;
  int rounds = 12;  // slices per compared row, taking turns (set from --seconds)
  bool smoke = false;
  bool help = false;
  Only only = Only::kAll;
  std::optional<std::string> backend;
  fs::path dir = "/var/tmp";
};

Result<Options> parse_args(int argc, char** argv) {
  Options o;
  bool seconds_set = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&]() -> Result<std::string_view> {
      if (i + 1 >= argc) return Status::InvalidArgument(fmt::format("{} needs a value", a));
      return std::string_view(argv[++i]);
    };
    if (a == "--help" || a == "-h") {
      o.help = true;
    } else if (a == "--smoke") {
      o.smoke = true;
    } else if (a == "--seconds") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      char* end = nullptr;
      std::string s(v);
      o.seconds = std::strtod(s.c_str(), &end);
      if (end != s.c_str() + s.size() || !(o.seconds > 0) || o.seconds > 3600)
        return Status::InvalidArgument(
            fmt::format("--seconds {}: want a number of seconds in (0, 3600]", v));
      seconds_set = true;
    } else if (a == "--only") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      if (v == "sign")
        o.only = Only::kSign;
      else if (v == "vault")
        o.only = Only::kVault;
      else if (v == "ledger")
        o.only = Only::kLedger;
      else
        return Status::InvalidArgument(fmt::format("--only {}: want sign, vault or ledger", v));
    } else if (a == "--backend") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      std::vector<std::string> known = testing::key_store_backends();
      if (std::find(known.begin(), known.end(), v) == known.end())
        return Status::InvalidArgument(
            fmt::format("--backend {}: want one of {}", v, fmt::join(known, ", ")));
      o.backend = std::string(v);
    } else if (a == "--dir") {
      MEDGATE_ASSIGN_OR_RETURN(std::string_view v, value());
      o.dir = fs::path(v);
    } else {
      return Status::InvalidArgument(fmt::format("unknown argument {} (see --help)", a));
    }
  }
  if (o.smoke && !seconds_set) o.seconds = 0.05;
  o.rounds = std::max(1, static_cast<int>(std::lround(o.seconds / kSliceSeconds)));
  return o;
}

// ---- formatting ----

std::string size_name(std::size_t bytes) {
  if (bytes >= 1024 && bytes % 1024 == 0) return fmt::format("{} KiB", bytes / 1024);
  return fmt::format("{} B", bytes);
}

// How many times longer the measured operation takes than its baseline: baseline rate / rate.
std::string times_baseline(double rate_per_s, double baseline_per_s) {
  if (rate_per_s <= 0 || baseline_per_s <= 0) return "-";
  return fmt::format("{:.2f}x", baseline_per_s / rate_per_s);
}

// ---- the machine ----

void print_header(int argc, char** argv, const fs::path& scratch, const Options& options) {
  std::string command;
  for (int i = 0; i < argc; ++i) {
    if (i > 0) command += ' ';
    command += argv[i];
  }
  utsname u{};
  uname(&u);
#ifdef NDEBUG
  const char* build = "assertions off";
#else
  const char* build = "ASSERTIONS ON: not a Release build, the numbers are not representative";
#endif
  fmt::print("medgate key-custody benchmark (medgate {}, g++ {}, {}, {})\n", MEDGATE_VERSION,
             __VERSION__, build, OpenSSL_version(OPENSSL_VERSION));
  fmt::print("  command:  {}\n", command);
  fmt::print("  date:     {} (load average at start: {})\n", utc_now(), load_average());
  fmt::print("  machine:  {} CPUs (nproc), {}, {} {} {}\n", cpus_available(),
             first_line_with("/proc/cpuinfo", "model name"), u.sysname, u.release, u.machine);
  fmt::print("  scratch:  {}\n", scratch.string());
  fmt::print("  rows:     {:.2f} s each, compared rows interleaved in {} slices; MB = 10^6 bytes\n",
             options.seconds, options.rounds);
  std::fflush(stdout);
}

// ---- the driver ----

enum class Timing { kEachCall, kTotalOnly };

struct Run {
  std::uint64_t calls = 0;
  double seconds = 0;
  Timing timing = Timing::kTotalOnly;
  std::vector<std::int64_t> latency_ns;  // one per call with Timing::kEachCall
  double per_second() const { return seconds > 0 ? static_cast<double>(calls) / seconds : 0; }

  void merge(Run slice) {
    calls += slice.calls;
    seconds += slice.seconds;
    timing = slice.timing;
    latency_ns.insert(latency_ns.end(), slice.latency_ns.begin(), slice.latency_ns.end());
  }
};

// Runs `threads` threads for about `seconds`, each calling op(thread, i) for i = 0, 1, ... and
// at least once. With Timing::kEachCall every call is timed (two clock reads; the fast in-process
// rows use kTotalOnly so the clock does not dominate them). Stops at the first error.
template <typename Op>
Result<Run> run_for(std::string_view what, int threads, double seconds, Timing timing, Op op) {
  std::vector<std::vector<std::int64_t>> latencies(static_cast<std::size_t>(threads));
  std::vector<std::uint64_t> counts(static_cast<std::size_t>(threads), 0);
  std::atomic<bool> stop{false};
  std::latch start(threads + 1);
  std::mutex error_mu;
  Status first_error;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      auto& mine = latencies[static_cast<std::size_t>(t)];
      if (timing == Timing::kEachCall) mine.reserve(1 << 16);
      std::uint64_t i = 0;
      start.arrive_and_wait();
      do {
        Status s;
        if (timing == Timing::kEachCall) {
          auto t0 = Clock::now();
          s = op(t, i);
          mine.push_back(
              std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
        } else {
          s = op(t, i);
        }
        if (!s.ok()) {
          std::lock_guard lk(error_mu);
          if (first_error.ok()) first_error = s;
          stop = true;
          break;
        }
        ++i;
      } while (!stop.load(std::memory_order_relaxed));
      counts[static_cast<std::size_t>(t)] = i;
    });
  }
  start.arrive_and_wait();
  auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& th : pool) th.join();
  double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!first_error.ok())
    return first_error.with_context(fmt::format("{} with {} threads", what, threads));

  Run run;
  run.seconds = elapsed;
  run.timing = timing;
  for (std::uint64_t c : counts) run.calls += c;
  for (auto& v : latencies) run.latency_ns.insert(run.latency_ns.end(), v.begin(), v.end());
  return run;
}

// One measured row: given a number of seconds, runs and returns what it measured.
using Job = std::function<Result<Run>(double seconds)>;

// Runs the jobs round-robin, each for seconds / rounds per turn, `rounds` times, and merges each
// job's turns. Load on a shared machine comes and goes; interleaving spreads it over the rows
// being compared instead of letting it land on whichever row ran while it lasted.
Result<std::vector<Run>> interleaved(const std::vector<Job>& jobs, double seconds, int rounds) {
  std::vector<Run> runs(jobs.size());
  for (int r = 0; r < rounds; ++r) {
    for (std::size_t j = 0; j < jobs.size(); ++j) {
      MEDGATE_ASSIGN_OR_RETURN(Run slice, jobs[j](seconds / rounds));
      runs[j].merge(std::move(slice));
    }
  }
  return runs;
}

std::string p50(const Run& r) {
  if (r.timing != Timing::kEachCall) return "-";
  return fmt::format("{:.3f}", percentiles(r.latency_ns).p50_ms);
}
std::string p99(const Run& r) {
  if (r.timing != Timing::kEachCall) return "-";
  return fmt::format("{:.3f}", percentiles(r.latency_ns).p99_ms);
}

// ---- OpenSSL baselines ----

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct PkeyCtxFree {
  void operator()(EVP_PKEY_CTX* c) const { EVP_PKEY_CTX_free(c); }
};
struct CipherCtxFree {
  void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
};
using PkeyCtx = std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree>;
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree>;

// A P-256 key in process memory: what signing costs without custody.
class SoftwareSigner {
 public:
  static Result<SoftwareSigner> create() {
    SoftwareSigner s;
    s.key_.reset(EVP_EC_gen("P-256"));
    if (!s.key_) return Status::Internal("EVP_EC_gen(P-256) failed");
    return s;
  }
  // A signing context for one thread (EVP_PKEY_CTX is not to be shared between threads).
  Result<PkeyCtx> context() const {
    PkeyCtx ctx(EVP_PKEY_CTX_new(key_.get(), nullptr));
    if (!ctx || EVP_PKEY_sign_init(ctx.get()) != 1 ||
        EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()) != 1)
      return Status::Internal("cannot set up an OpenSSL ECDSA signing context");
    return ctx;
  }
  // A DER ECDSA-Sig-Value over `digest`, as KeyStore::sign_digest returns.
  static Result<Bytes> sign(EVP_PKEY_CTX* ctx, const Hash& digest) {
    Bytes sig(80);
    std::size_t len = sig.size();
    if (EVP_PKEY_sign(ctx, u8(std::span<std::byte>(sig)), &len, u8(ByteView(digest)),
                      digest.size()) != 1)
      return Status::Internal("EVP_PKEY_sign failed");
    sig.resize(len);
    return sig;
  }

 private:
  std::unique_ptr<EVP_PKEY, PkeyFree> key_;
};

constexpr std::size_t kIvBytes = 12, kTagBytes = 16;

// Bare AES-256-GCM as a straightforward caller writes it: a new context and a random IV per
// message, out = iv || ciphertext || tag.
Result<Bytes> gcm_seal(ByteView key, ByteView plaintext, ByteView aad) {
  Bytes out(kIvBytes + plaintext.size() + kTagBytes);
  std::span<std::byte> iv(out.data(), kIvBytes);
  if (RAND_bytes(u8(iv), static_cast<int>(kIvBytes)) != 1)
    return Status::Internal("RAND_bytes failed");
  CipherCtx c(EVP_CIPHER_CTX_new());
  int n = 0, m = 0;
  unsigned char* ct = u8(std::span<std::byte>(out)) + kIvBytes;
  if (!c || EVP_EncryptInit_ex(c.get(), EVP_aes_256_gcm(), nullptr, u8(key), u8(iv)) != 1 ||
      EVP_EncryptUpdate(c.get(), nullptr, &n, u8(aad), static_cast<int>(aad.size())) != 1 ||
      EVP_EncryptUpdate(c.get(), ct, &n, u8(plaintext), static_cast<int>(plaintext.size())) != 1 ||
      EVP_EncryptFinal_ex(c.get(), ct + n, &m) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagBytes),
                          ct + plaintext.size()) != 1)
    return Status::Internal("AES-256-GCM encryption failed");
  return out;
}

Result<Bytes> gcm_open(ByteView key, ByteView sealed, ByteView aad) {
  if (sealed.size() < kIvBytes + kTagBytes) return Status::InvalidArgument("too short");
  std::size_t ct_size = sealed.size() - kIvBytes - kTagBytes;
  Bytes out(ct_size);
  Bytes tag(sealed.end() - kTagBytes, sealed.end());
  CipherCtx c(EVP_CIPHER_CTX_new());
  int n = 0, m = 0;
  if (!c ||
      EVP_DecryptInit_ex(c.get(), EVP_aes_256_gcm(), nullptr, u8(key),
                         u8(sealed.first(kIvBytes))) != 1 ||
      EVP_DecryptUpdate(c.get(), nullptr, &n, u8(aad), static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(c.get(), u8(std::span<std::byte>(out)), &n,
                        u8(sealed.subspan(kIvBytes, ct_size)), static_cast<int>(ct_size)) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagBytes), tag.data()) !=
          1 ||
      EVP_DecryptFinal_ex(c.get(), u8(std::span<std::byte>(out)) + n, &m) != 1)
    return Status::VerificationFailed("AES-256-GCM decryption failed");
  return out;
}

Result<Bytes> random_bytes(std::size_t n) {
  Bytes b(n);
  if (RAND_bytes(u8(std::span<std::byte>(b)), static_cast<int>(n)) != 1)
    return Status::Internal("RAND_bytes failed");
  return b;
}

// ECDH P-256 with a key in process memory against one peer: what agree() costs without custody.
class SoftwareAgreement {
 public:
  static Result<SoftwareAgreement> create(EVP_PKEY* peer) {
    SoftwareAgreement a;
    a.key_.reset(EVP_EC_gen("P-256"));
    if (!a.key_) return Status::Internal("EVP_EC_gen(P-256) failed");
    a.ctx_.reset(EVP_PKEY_CTX_new(a.key_.get(), nullptr));
    if (!a.ctx_ || EVP_PKEY_derive_init(a.ctx_.get()) != 1 ||
        EVP_PKEY_derive_set_peer(a.ctx_.get(), peer) != 1)
      return Status::Internal("cannot set up an OpenSSL ECDH context");
    return a;
  }
  // Z, 32 bytes, wiped with the SecretBytes as the key store's is.
  Result<hsm::SecretBytes> derive() const {
    Bytes z(32);
    std::size_t n = z.size();
    if (EVP_PKEY_derive(ctx_.get(), u8(std::span<std::byte>(z)), &n) != 1 || n != 32)
      return Status::Internal("EVP_PKEY_derive failed");
    return hsm::SecretBytes(std::move(z));
  }

 private:
  std::unique_ptr<EVP_PKEY, PkeyFree> key_;
  PkeyCtx ctx_;
};

// Z of ECDH between `mine` (a private key in memory) and `peer`, for checking the key store's.
Result<Bytes> openssl_ecdh(EVP_PKEY* mine, const PublicKey& peer) {
  const unsigned char* p = u8(ByteView(peer.spki_der()));
  std::unique_ptr<EVP_PKEY, PkeyFree> peer_key(
      d2i_PUBKEY(nullptr, &p, static_cast<long>(peer.spki_der().size())));
  PkeyCtx ctx(EVP_PKEY_CTX_new(mine, nullptr));
  Bytes z(32);
  std::size_t n = z.size();
  if (!peer_key || !ctx || EVP_PKEY_derive_init(ctx.get()) != 1 ||
      EVP_PKEY_derive_set_peer(ctx.get(), peer_key.get()) != 1 ||
      EVP_PKEY_derive(ctx.get(), u8(std::span<std::byte>(z)), &n) != 1 || n != 32)
    return Status::Internal("OpenSSL ECDH with the key store's agreement key failed");
  return z;
}

Result<PublicKey> public_half(EVP_PKEY* key) {
  unsigned char* der = nullptr;
  const int n = i2d_PUBKEY(key, &der);
  if (n <= 0) return Status::Internal("i2d_PUBKEY failed");
  Bytes spki(reinterpret_cast<std::byte*>(der), reinterpret_cast<std::byte*>(der) + n);
  OPENSSL_free(der);
  return PublicKey::from_spki_der(spki);
}

// ---- the backend under test ----

// One backend's device and the key store opened on it. Closed (store first, then the device)
// before the next backend comes up: SoftHSM allows one configuration per process.
struct Backend {
  std::string name;
  fs::path dir;
  std::unique_ptr<testing::TestKeyStore> device;
  std::unique_ptr<hsm::KeyStore> store;

  bool is_tpm() const { return name == "tpm2"; }
  std::string label() const { return is_tpm() ? "tpm2 (swtpm)" : name; }
};

void print_backend_intro(const Backend& b) {
  fmt::print("=== backend: {} ===\n", b.label());
  fmt::print("  key store: {}\n", b.store->description());
  if (b.is_tpm()) {
    fmt::print(
        "  NOTE: swtpm is a SOFTWARE TPM (libtpms in another process, over loopback TCP). A\n"
        "  hardware TPM signs in ~200 ms median (about 5 signs/s), so these signing numbers are\n"
        "  not what a field device does; medgate never signs per entry (heads are signed once\n"
        "  per head_interval, off the append path). wrap_key, unwrap_key and keyed_hash run in\n"
        "  process memory under keys unsealed from the TPM at open, so they do not touch it;\n"
        "  random() (a new patient's data key) is a TPM2_GetRandom.\n");
  }
  fmt::print("\n");
  std::fflush(stdout);
}

// ---- 1 and 2: signing and key operations ----

std::vector<Hash> bench_digests() {
  std::vector<Hash> digests;
  for (std::size_t i = 0; i < kDigests; ++i)
    digests.push_back(sha256(as_bytes(fmt::format("medgate bench digest {}", i))));
  return digests;
}

Status run_sign_phase(Backend& b, const Options& options) {
  std::vector<Hash> digests = bench_digests();
  auto digest = [&](std::uint64_t i) -> const Hash& { return digests[i % digests.size()]; };

  // One untimed signature per signer, checked, so the rows measure a signature that verifies.
  MEDGATE_ASSIGN_OR_RETURN(Bytes probe, b.store->sign_digest(digests[0]));
  MEDGATE_RETURN_IF_ERROR(b.store->signing_key().verify_digest(digests[0], probe));

  MEDGATE_ASSIGN_OR_RETURN(SoftwareSigner software, SoftwareSigner::create());
  std::vector<PkeyCtx> contexts;
  for (int t = 0; t < 2; ++t) {
    MEDGATE_ASSIGN_OR_RETURN(PkeyCtx ctx, software.context());
    contexts.push_back(std::move(ctx));
  }

  fmt::print(
      "Signing: ECDSA P-256 over SHA-256 digests ({} distinct, in turn); latency is one call.\n"
      "\"x baseline\" is how many times longer a signature takes than the baseline's at the same\n"
      "thread count.\n\n",
      kDigests);
  Table table({"signer", "threads", "signs", "signs/s", "p50 ms", "p99 ms", "x baseline"});

  auto sign_on = [&](hsm::KeyStore* const* stores, int threads) -> Job {
    return [=, &digest](double seconds) {
      return run_for(
          "sign_digest", threads, seconds, Timing::kEachCall,
          [&](int t, std::uint64_t i) { return stores[t]->sign_digest(digest(i)).status(); });
    };
  };
  auto baseline = [&](int threads) -> Job {
    return [&, threads](double seconds) {
      return run_for(
          "OpenSSL sign", threads, seconds, Timing::kEachCall, [&](int t, std::uint64_t i) {
            return SoftwareSigner::sign(contexts[static_cast<std::size_t>(t)].get(), digest(i))
                .status();
          });
    };
  };
  auto add = [&](std::string signer, int threads, const Run& r, const Run* base) {
    table.row({std::move(signer), std::to_string(threads), grouped(r.calls), rate(r.per_second()),
               p50(r), p99(r), base ? times_baseline(r.per_second(), base->per_second()) : ""});
  };
  const std::string baseline_label = "baseline: OpenSSL software key (not custody)";

  hsm::KeyStore* const same[] = {b.store.get(), b.store.get()};
  MEDGATE_ASSIGN_OR_RETURN(std::vector<Run> one, interleaved({sign_on(same, 1), baseline(1)},
                                                             options.seconds, options.rounds));
  add(fmt::format("{}: KeyStore::sign_digest", b.label()), 1, one[0], &one[1]);
  add(baseline_label, 1, one[1], nullptr);

  if (!b.is_tpm()) {
    // The store holds one session behind a mutex: two threads on it queue. A second store on the
    // same token has a session of its own, as a second process would.
    MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<hsm::KeyStore> second,
                             hsm::open_key_store(b.device->config(), hsm::KeyPolicy::kUseExisting));
    MEDGATE_RETURN_IF_ERROR(second->use_signing_key(b.store->signing_key().id()));
    MEDGATE_ASSIGN_OR_RETURN(Bytes probe2, second->sign_digest(digests[1]));
    MEDGATE_RETURN_IF_ERROR(b.store->signing_key().verify_digest(digests[1], probe2));
    hsm::KeyStore* const own[] = {b.store.get(), second.get()};
    MEDGATE_ASSIGN_OR_RETURN(std::vector<Run> two,
                             interleaved({sign_on(same, 2), sign_on(own, 2), baseline(2)},
                                         options.seconds, options.rounds));
    second.reset();
    add(fmt::format("{}: sign_digest, one store (one session)", b.label()), 2, two[0], &two[2]);
    add(fmt::format("{}: sign_digest, a store (session) per thread", b.label()), 2, two[1],
        &two[2]);
    add(baseline_label, 2, two[2], nullptr);
  }
  table.print(/*blank_line_after=*/true);

  // wrap/unwrap of a data key as the vault does it: 32 bytes, context = label || pseudonym.
  MEDGATE_ASSIGN_OR_RETURN(Bytes data_key, random_bytes(kDataKeyBytes));
  Bytes context = to_bytes("medgate data-key v1");
  context.resize(context.size() + 32, std::byte{0x5a});
  MEDGATE_ASSIGN_OR_RETURN(Bytes wrapped, b.store->wrap_key(data_key, context));
  MEDGATE_ASSIGN_OR_RETURN(hsm::SecretBytes unwrapped, b.store->unwrap_key(wrapped, context));
  if (!std::ranges::equal(unwrapped.view(), ByteView(data_key)))
    return Status::Internal("unwrap_key did not give back the wrapped key");
  std::string message = std::string("medgate patient v1") + '\0' + "MRN-0001234567";

  fmt::print(
      "Key operations: wrap_key / unwrap_key of a {}-byte data key with a {}-byte context (as\n"
      "the vault calls them), keyed_hash of a {}-byte identifier message; 1 thread.\n\n",
      kDataKeyBytes, context.size(), message.size());
  Table ops({"operation", "calls", "calls/s", "p50 ms", "p99 ms"});
  MEDGATE_ASSIGN_OR_RETURN(
      Run wrap, run_for("wrap_key", 1, options.seconds, Timing::kEachCall, [&](int, std::uint64_t) {
        return b.store->wrap_key(data_key, context).status();
      }));
  ops.row({fmt::format("{}: wrap_key", b.label()), grouped(wrap.calls), rate(wrap.per_second()),
           p50(wrap), p99(wrap)});
  MEDGATE_ASSIGN_OR_RETURN(
      Run unwrap,
      run_for("unwrap_key", 1, options.seconds, Timing::kEachCall,
              [&](int, std::uint64_t) { return b.store->unwrap_key(wrapped, context).status(); }));
  ops.row({fmt::format("{}: unwrap_key", b.label()), grouped(unwrap.calls),
           rate(unwrap.per_second()), p50(unwrap), p99(unwrap)});
  MEDGATE_ASSIGN_OR_RETURN(
      Run mac,
      run_for("keyed_hash", 1, options.seconds, Timing::kEachCall,
              [&](int, std::uint64_t) { return b.store->keyed_hash(as_bytes(message)).status(); }));
  ops.row({fmt::format("{}: keyed_hash", b.label()), grouped(mac.calls), rate(mac.per_second()),
           p50(mac), p99(mac)});
  ops.print(/*blank_line_after=*/true);

  // Key agreement as open_sealed_box() does it: one ECDH with the store's agreement key. One
  // untimed call made (or found) the key and is checked against OpenSSL's ECDH first.
  std::unique_ptr<EVP_PKEY, PkeyFree> peer(EVP_EC_gen("P-256"));
  if (!peer) return Status::Internal("EVP_EC_gen(P-256) failed");
  MEDGATE_ASSIGN_OR_RETURN(PublicKey peer_public, public_half(peer.get()));
  MEDGATE_ASSIGN_OR_RETURN(PublicKey agreement, b.store->agreement_key());
  MEDGATE_ASSIGN_OR_RETURN(hsm::SecretBytes z, b.store->agree(peer_public));
  MEDGATE_ASSIGN_OR_RETURN(Bytes expected, openssl_ecdh(peer.get(), agreement));
  if (!std::ranges::equal(z.view(), ByteView(expected)))
    return Status::Internal("the key store's ECDH does not agree with OpenSSL's");
  MEDGATE_ASSIGN_OR_RETURN(SoftwareAgreement software_ecdh, SoftwareAgreement::create(peer.get()));
  fmt::print(
      "Key agreement: ECDH P-256 of the store's agreement key with one peer key (a sealed box's\n"
      "ephemeral key); Z checked against OpenSSL once; 1 thread.{}\n\n",
      b.is_tpm() ? "\nTPM: a TPM2_Load, TPM2_ECDH_ZGen and TPM2_FlushContext per call." : "");
  Table agree_table({"agreement", "calls", "calls/s", "p50 ms", "p99 ms", "x baseline"});
  MEDGATE_ASSIGN_OR_RETURN(
      std::vector<Run> agreed,
      interleaved(
          {[&](double seconds) {
             return run_for("agree", 1, seconds, Timing::kEachCall, [&](int, std::uint64_t) {
               return b.store->agree(peer_public).status();
             });
           },
           [&](double seconds) {
             return run_for("OpenSSL derive", 1, seconds, Timing::kEachCall,
                            [&](int, std::uint64_t) { return software_ecdh.derive().status(); });
           }},
          options.seconds, options.rounds));
  agree_table.row({fmt::format("{}: KeyStore::agree", b.label()), grouped(agreed[0].calls),
                   rate(agreed[0].per_second()), p50(agreed[0]), p99(agreed[0]),
                   times_baseline(agreed[0].per_second(), agreed[1].per_second())});
  agree_table.row({"baseline: OpenSSL EVP_PKEY_derive, software key", grouped(agreed[1].calls),
                   rate(agreed[1].per_second()), p50(agreed[1]), p99(agreed[1]), ""});
  agree_table.print(/*blank_line_after=*/true);
  return Status::Ok();
}

// ---- 3: the vault ----

double megabytes_per_second(const Run& r, std::size_t size) {
  return r.per_second() * static_cast<double>(size) / 1e6;
}

Status run_vault_phase(Backend& b, const Options& options) {
  fs::path dir = b.dir / "vault";
  fs::create_directories(dir);
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<appliance::Vault> vault,
                           appliance::Vault::open(dir / "vault.db", *b.store));
  // The patient's record is created and its key cached before anything is timed.
  MEDGATE_ASSIGN_OR_RETURN(appliance::Pseudonym patient, vault->pseudonym("bench-patient-0"));
  MEDGATE_ASSIGN_OR_RETURN(Bytes baseline_key, random_bytes(kDataKeyBytes));
  ByteView aad = as_bytes(kAad);

  fmt::print(
      "Vault: encrypt/decrypt for one patient whose data key is cached (AES-256-GCM, random IV;\n"
      "the vault also binds a label and the pseudonym as AAD and adds a version byte), beside\n"
      "bare OpenSSL AES-256-GCM with a new context and random IV per message; 1 thread. MB/s\n"
      "counts plaintext bytes.\n\n");
  Table table({"operation", "size", "calls", "calls/s", "MB/s", "baseline MB/s", "x baseline"});
  for (std::size_t size : kVaultSizes) {
    MEDGATE_ASSIGN_OR_RETURN(Bytes plaintext, random_bytes(size));
    MEDGATE_ASSIGN_OR_RETURN(Bytes sealed, vault->encrypt(patient, plaintext, aad));
    MEDGATE_ASSIGN_OR_RETURN(Bytes opened, vault->decrypt(patient, sealed, aad));
    MEDGATE_ASSIGN_OR_RETURN(Bytes base_sealed, gcm_seal(baseline_key, plaintext, aad));
    MEDGATE_ASSIGN_OR_RETURN(Bytes base_opened, gcm_open(baseline_key, base_sealed, aad));
    if (opened != plaintext || base_opened != plaintext)
      return Status::Internal("a payload did not decrypt to what was encrypted");

    auto job = [](std::string_view what, auto op) -> Job {
      return
          [what, op](double seconds) { return run_for(what, 1, seconds, Timing::kTotalOnly, op); };
    };
    MEDGATE_ASSIGN_OR_RETURN(
        std::vector<Run> runs,
        interleaved(
            {job("vault encrypt",
                 [&](int, std::uint64_t) {
                   return vault->encrypt(patient, plaintext, aad).status();
                 }),
             job("AES-256-GCM seal",
                 [&](int, std::uint64_t) {
                   return gcm_seal(baseline_key, plaintext, aad).status();
                 }),
             job("vault decrypt",
                 [&](int, std::uint64_t) { return vault->decrypt(patient, sealed, aad).status(); }),
             job("AES-256-GCM open",
                 [&](int, std::uint64_t) {
                   return gcm_open(baseline_key, base_sealed, aad).status();
                 })},
            options.seconds, options.rounds));
    const Run &enc = runs[0], &base_enc = runs[1], &dec = runs[2], &base_dec = runs[3];
    auto add = [&](const char* op, const Run& r, const Run& base) {
      table.row({op, size_name(size), grouped(r.calls), rate(r.per_second()),
                 fmt::format("{:.1f}", megabytes_per_second(r, size)),
                 fmt::format("{:.1f}", megabytes_per_second(base, size)),
                 times_baseline(r.per_second(), base.per_second())});
    };
    add("vault encrypt", enc, base_enc);
    add("vault decrypt", dec, base_dec);
  }
  table.print(/*blank_line_after=*/true);

  // A never-seen identifier: keyed_hash, then random(32) + wrap_key + seal the identifier + one
  // INSERT committed with synchronous=FULL.
  fmt::print(
      "New patients: pseudonym() of a never-seen identifier (keyed_hash; then a data key from\n"
      "the key store's RNG, wrap_key, the identifier sealed, one durable SQLite INSERT); 1 "
      "thread.\n"
      "Vault file: {}\n\n",
      (dir / "vault.db").string());
  // Beside it, the disk's floor for one durable commit, taking turns with it.
  fs::path probe_path = dir / "fsync-floor";
  int fd = ::open(probe_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status::IOError(fmt::format("cannot create {}", probe_path.string()));
  std::vector<char> page(4096, 'x');
  std::uint64_t next_id = 0;  // identifiers never repeat across slices
  Result<std::vector<Run>> runs = interleaved(
      {[&](double seconds) {
         return run_for("pseudonym (new)", 1, seconds, Timing::kEachCall, [&](int, std::uint64_t) {
           return vault->pseudonym(fmt::format("bench-new-patient-{}", next_id++)).status();
         });
       },
       [&](double seconds) {
         return run_for(
             "fdatasync", 1, seconds, Timing::kEachCall, [&](int, std::uint64_t) -> Status {
               if (::write(fd, page.data(), page.size()) != static_cast<ssize_t>(page.size()) ||
                   ::fdatasync(fd) != 0)
                 return Status::IOError("write or fdatasync failed");
               return Status::Ok();
             });
       }},
      options.seconds, options.rounds);
  ::close(fd);
  if (!runs.ok()) return runs.status();
  const Run &fresh = (*runs)[0], &floor = (*runs)[1];
  Table patients({"operation", "calls", "calls/s", "p50 ms", "p99 ms"});
  patients.row({fmt::format("{}: pseudonym() of a new id", b.label()), grouped(fresh.calls),
                rate(fresh.per_second()), p50(fresh), p99(fresh)});
  patients.row({"floor: 4 KiB write + fdatasync, same disk", grouped(floor.calls),
                rate(floor.per_second()), p50(floor), p99(floor)});
  patients.print(/*blank_line_after=*/true);
  vault.reset();
  fs::remove_all(dir);
  return Status::Ok();
}

// ---- 4: the ledger, encryption off and on ----

enum class Encryption { kOff, kOn };

// An observation-sized admin-action entry: {"op": "observation", "args": {"n": n, "payload":
// bytes}} with the patient's pseudonym as its subject. "on" puts vault.encrypt(payload) there.
Result<ledger::Entry> observation_entry(std::uint64_t n, const appliance::Pseudonym& patient,
                                        Bytes payload) {
  using ledger::cbor::Value;
  MEDGATE_ASSIGN_OR_RETURN(
      Value args, Value::map({{Value::text("n"), Value::uint(n)},
                              {Value::text("payload"), Value::bytes(std::move(payload))}}));
  MEDGATE_ASSIGN_OR_RETURN(Value body, Value::map({{Value::text("op"), Value::text("observation")},
                                                   {Value::text("args"), std::move(args)}}));
  ledger::Entry e;
  e.type = ledger::EntryType::kAdminAction;
  e.time_us = ledger::now_us();
  e.actor = "device:bench";
  e.body = std::move(body);
  e.subjects.push_back({Bytes(patient.bytes.begin(), patient.bytes.end()), std::nullopt});
  return e;
}

// Builds the entries of one mode; the thread's own patient is patients[thread].
class ObservationMaker {
 public:
  ObservationMaker(appliance::Vault& vault, const std::vector<appliance::Pseudonym>& patients,
                   const Bytes& payload, Encryption encryption)
      : vault_(vault), patients_(patients), payload_(payload), encryption_(encryption) {}

  Result<ledger::Entry> make(int thread, std::uint64_t n) const {
    const appliance::Pseudonym& p = patients_[static_cast<std::size_t>(thread)];
    switch (encryption_) {
      case Encryption::kOff:
        return observation_entry(n, p, payload_);
      case Encryption::kOn: {
        MEDGATE_ASSIGN_OR_RETURN(Bytes sealed, vault_.encrypt(p, payload_, as_bytes(kAad)));
        return observation_entry(n, p, std::move(sealed));
      }
    }
    return Status::Internal("unknown encryption mode");
  }

  // The canonical size of one entry.
  Result<std::size_t> entry_bytes() const {
    MEDGATE_ASSIGN_OR_RETURN(ledger::Entry e, make(0, 0));
    MEDGATE_ASSIGN_OR_RETURN(Bytes encoded, ledger::encode_entry(e));
    return encoded.size();
  }

 private:
  appliance::Vault& vault_;
  const std::vector<appliance::Pseudonym>& patients_;
  const Bytes& payload_;
  Encryption encryption_;
};

struct LedgerCounts {
  std::uint64_t appended = 0;  // as the ledger counts them, genesis included
  std::uint64_t commits = 0;
};

// One slice: a fresh ledger at `path`, `threads` appenders for `seconds`, closed and removed.
// Timed per call: building the entry (encrypting its payload when on) plus append() until durable.
Result<Run> append_slice(const fs::path& path, hsm::KeyStore& signer, const ObservationMaker& maker,
                         int threads, double seconds, LedgerCounts& counts) {
  ledger::LedgerOptions lo;
  lo.path = path;
  lo.head_interval = kHeadInterval;
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<ledger::Ledger> ledger,
                           ledger::Ledger::create(lo, "bench-keys", signer, "user:bench"));
  MEDGATE_ASSIGN_OR_RETURN(Run run,
                           run_for("ledger append", threads, seconds, Timing::kEachCall,
                                   [&](int t, std::uint64_t i) -> Status {
                                     std::uint64_t n = i * static_cast<std::uint64_t>(threads) +
                                                       static_cast<std::uint64_t>(t);
                                     MEDGATE_ASSIGN_OR_RETURN(ledger::Entry e, maker.make(t, n));
                                     return ledger->append(e).status();
                                   }));
  ledger->close();
  ledger::LedgerStats stats = ledger->stats();
  ledger.reset();
  if (!stats.writer_error.empty()) return Status::IOError("ledger writer: " + stats.writer_error);
  counts.appended += stats.appended;
  counts.commits += stats.batches;
  for (const char* suffix : {"", "-wal", "-shm", ".lock"}) {
    std::error_code ec;
    fs::remove(fs::path(path.string() + suffix), ec);
  }
  return run;
}

Status run_ledger_phase(Backend& b, const Options& options) {
  fs::path dir = b.dir / "ledger";
  fs::create_directories(dir);
  MEDGATE_ASSIGN_OR_RETURN(std::unique_ptr<appliance::Vault> vault,
                           appliance::Vault::open(dir / "vault.db", *b.store));
  int most = *std::max_element(std::begin(kLedgerThreads), std::end(kLedgerThreads));
  std::vector<appliance::Pseudonym> patients;  // one per thread, keys cached before timing
  for (int t = 0; t < most; ++t) {
    MEDGATE_ASSIGN_OR_RETURN(appliance::Pseudonym p,
                             vault->pseudonym(fmt::format("bench-ledger-patient-{}", t)));
    MEDGATE_RETURN_IF_ERROR(vault->encrypt(p, {}, {}).status());
    patients.push_back(p);
  }
  // A SenML-like observation repeated to kPayloadBytes.
  constexpr std::string_view kObservation =
      R"([{"bn":"urn:dev:mac:0024befffe804ff1:","n":"spo2","u":"%","v":97}])";
  Bytes payload(kPayloadBytes);
  for (std::size_t i = 0; i < payload.size(); ++i)
    payload[i] = static_cast<std::byte>(kObservation[i % kObservation.size()]);

  const ObservationMaker makers[] = {{*vault, patients, payload, Encryption::kOff},
                                     {*vault, patients, payload, Encryption::kOn}};
  const char* const names[] = {"off", "on"};

  fmt::print(
      "Ledger appends, payload encryption off vs on: each thread (its own patient) builds an\n"
      "admin-action entry carrying a {}-byte payload, in clear (\"off\") or vault.encrypt()ed\n"
      "first (\"on\"), and calls append(), which returns once durable; latency covers both.\n"
      "Heads are signed by this backend every {} ms, off the append path. Off and on alternate\n"
      "in {} slices each, a fresh ledger file per slice. Commits include the ledger's own few\n"
      "(genesis, heads, counter epochs).\n\n",
      kPayloadBytes, kHeadInterval.count(), options.rounds);
  Table table({"encryption", "threads", "entry bytes", "entries", "entries/s", "p50 ms", "p99 ms",
               "entries/commit"});
  Table ratios({"threads", "off entries/s", "on entries/s", "on/off"});
  int slice = 0;
  for (int threads : kLedgerThreads) {
    LedgerCounts counts[2];
    std::vector<Job> jobs;
    for (int m = 0; m < 2; ++m) {
      jobs.push_back([&, m, threads](double seconds) {
        return append_slice(dir / fmt::format("ledger-{}.db", slice++), *b.store, makers[m],
                            threads, seconds, counts[m]);
      });
    }
    MEDGATE_ASSIGN_OR_RETURN(std::vector<Run> runs,
                             interleaved(jobs, options.seconds, options.rounds));
    for (int m = 0; m < 2; ++m) {
      MEDGATE_ASSIGN_OR_RETURN(std::size_t entry_bytes, makers[m].entry_bytes());
      const Run& r = runs[static_cast<std::size_t>(m)];
      table.row({names[m], std::to_string(threads), std::to_string(entry_bytes), grouped(r.calls),
                 rate(r.per_second()), p50(r), p99(r),
                 counts[m].commits
                     ? fmt::format("{:.1f}", static_cast<double>(counts[m].appended) /
                                                 static_cast<double>(counts[m].commits))
                     : "-"});
    }
    double off = runs[0].per_second(), on = runs[1].per_second();
    ratios.row({std::to_string(threads), rate(off), rate(on),
                off > 0 ? fmt::format("{:.2f}", on / off) : "-"});
  }
  table.print(/*blank_line_after=*/true);
  fmt::print("  Append rate with encryption on, over off (1.00 = no cost):\n\n");
  ratios.print(/*blank_line_after=*/true);
  vault.reset();
  fs::remove_all(dir);
  return Status::Ok();
}

// ---- the run ----

Status run_backend(const std::string& name, const fs::path& scratch, const Options& options) {
  Backend b;
  b.name = name;
  b.dir = scratch / name;
  fs::create_directories(b.dir);
  try {
    b.device = std::make_unique<testing::TestKeyStore>(name, b.dir);
  } catch (const std::exception& e) {
    return Status::Unavailable(fmt::format("cannot bring up {}: {}", name, e.what()));
  }
  MEDGATE_ASSIGN_OR_RETURN(b.store, b.device->try_open(hsm::KeyPolicy::kCreateIfMissing));
  print_backend_intro(b);
  Status s;
  if (options.only == Only::kAll || options.only == Only::kSign) s = run_sign_phase(b, options);
  if (s.ok() && (options.only == Only::kAll || options.only == Only::kVault))
    s = run_vault_phase(b, options);
  if (s.ok() && (options.only == Only::kAll || options.only == Only::kLedger))
    s = run_ledger_phase(b, options);
  b.store.reset();  // every key store of this device closes before the device goes
  b.device.reset();
  return s.ok() ? s : s.with_context(b.label());
}

Status run(int argc, char** argv, const Options& options) {
  std::error_code ec;
  fs::create_directories(options.dir, ec);
  if (!fs::is_directory(options.dir))
    return Status::InvalidArgument(
        fmt::format("--dir {} is not a directory", options.dir.string()));
  // TempDir makes its directory under $TMPDIR: point that at --dir.
  ::setenv("TMPDIR", fs::absolute(options.dir).c_str(), 1);
  testing::TempDir scratch("medgate-bench-keys");
  print_header(argc, argv, scratch.path(), options);
  int fsync_samples = options.smoke ? 5 : 50;
  MEDGATE_ASSIGN_OR_RETURN(Percentiles disk, probe_fsync(scratch.path(), fsync_samples));
  fmt::print(
      "  fsync:    4 KiB append + fdatasync in scratch: p50 {:.3f} ms, p99 {:.3f} ms ({} "
      "samples)\n\n",
      disk.p50_ms, disk.p99_ms, fsync_samples);
  for (const std::string& name : testing::key_store_backends()) {
    if (options.backend && *options.backend != name) continue;
    MEDGATE_RETURN_IF_ERROR(run_backend(name, scratch.path(), options));
  }
  fmt::print("load average at end: {}\n", load_average());
  return Status::Ok();
}

}  // namespace
}  // namespace medgate::bench

int main(int argc, char** argv) {
  using namespace medgate;
  Result<bench::Options> options = bench::parse_args(argc, argv);
  if (!options.ok()) {
    fmt::print(stderr, "bench_keys: {}\n", options.status().message());
    return 2;
  }
  if (options->help) {
    fmt::print("{}", bench::kUsage);
    return 0;
  }
  Status s = bench::run(argc, argv, *options);
  if (!s.ok()) {
    fmt::print(stderr, "bench_keys: {}\n", s.to_string());
    return 1;
  }
  return 0;
}
